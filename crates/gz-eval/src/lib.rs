//! gz-eval: Kaggle RMSE, baselines, predictions with TTA, ensembles, submissions and reports.
//! Not built yet: see the evaluation issue.
