//! gz-model networks: parameter counts and output shapes of every architecture, the tree
//! output layer on real model outputs, dropout only in training, input checks.

use gz_model::config::{Arch, ModelConfig, OutputKind};
use gz_model::nets::{self, DType, Device, Model, ModuleT, Tensor, VarBuilder, VarMap};
use gz_schema::N_ANSWERS;

fn build(cfg: &ModelConfig) -> (Model, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = nets::build(cfg, vb).expect("build model");
    (model, varmap)
}

fn varmap_params(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// A deterministic batch of images in [0, 1].
fn images(b: usize, size: usize) -> Tensor {
    let n = b * 3 * size * size;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0)
        .collect();
    Tensor::from_vec(v, (b, 3, size, size), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn vgg16_blog_has_the_blog_parameter_count() {
    let cfg = ModelConfig::from_name("vgg16-blog", OutputKind::Sigmoid).unwrap();
    let (model, varmap) = build(&cfg);
    // 14,714,688 conv + 4608·4096+4096 + 4096·4096+4096 + 4096·37+37
    assert_eq!(model.param_count(), 50_526_053);
    assert_eq!(varmap_params(&varmap), model.param_count());
    assert_eq!(nets::param_count_of(&cfg), model.param_count());
    let flatten = model.layers().iter().find(|l| l.name == "flatten").unwrap();
    assert_eq!(flatten.out_shape, vec![4608]);
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    for key in [
        "block1_conv1.weight",
        "block5_conv3.bias",
        "fc1.weight",
        "fc2.bias",
        "out.weight",
    ] {
        assert!(
            names.iter().any(|n| n == key),
            "checkpoint key {key} missing: {names:?}"
        );
    }
    let text = nets::describe(&model);
    assert!(text.contains("block5_pool") && text.contains("50,526,053"), "{text}");
}

#[test]
fn vgg16_blog_forward_shape() {
    let cfg = ModelConfig::from_name("vgg16-blog", OutputKind::Sigmoid).unwrap();
    let (model, _vm) = build(&cfg);
    let y = model.forward_t(&images(1, 106), false).unwrap();
    assert_eq!(y.dims(), &[1, N_ANSWERS]);
    assert!(rows(&y)[0].iter().all(|p| *p > 0.0 && *p < 1.0));
}

#[test]
fn dieleman_has_the_paper_geometry() {
    let cfg = ModelConfig::from_name("dieleman", OutputKind::Tree).unwrap();
    let (model, varmap) = build(&cfg);
    // conv 3,488 + 51,264 + 73,856 + 147,584; dense 8192·4096+4096, 2048·4096+4096, 2048·37+37
    assert_eq!(model.param_count(), 42_303_237);
    assert_eq!(varmap_params(&varmap), model.param_count());
    let y = model.forward_t(&images(1, 106), false).unwrap();
    assert_eq!(y.dims(), &[1, N_ANSWERS]);
    for row in rows(&y) {
        assert!(gz_schema::check_row(&row, 1e-5).is_empty());
    }
    // any cached image size works: the views are resampled to 69×69
    let y = model.forward_t(&images(1, 80), false).unwrap();
    assert_eq!(y.dims(), &[1, N_ANSWERS]);
}

#[test]
fn every_arch_builds_and_counts_its_parameters() {
    for arch in Arch::ALL {
        for output in [OutputKind::Sigmoid, OutputKind::Tree] {
            let cfg = ModelConfig::new(arch, output);
            let text = nets::describe_config(&cfg);
            assert!(
                text.contains(arch.name()) && text.contains("total parameters"),
                "{text}"
            );
            if matches!(arch, Arch::Tiny | Arch::DielemanTiny) {
                // the big nets are built (once) by their own tests above
                let (model, varmap) = build(&cfg);
                assert_eq!(varmap_params(&varmap), model.param_count(), "{arch}/{output}");
                assert_eq!(model.describe(), text);
            }
        }
    }
    let tiny = nets::param_count_of(&ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid));
    let dtiny = nets::param_count_of(&ModelConfig::new(Arch::DielemanTiny, OutputKind::Tree));
    assert!(tiny < 200_000, "tiny has {tiny} parameters");
    assert!(dtiny < 1_000_000, "dieleman-tiny has {dtiny} parameters");
}

#[test]
fn tiny_nets_output_shapes_and_tree_property() {
    for arch in [Arch::Tiny, Arch::DielemanTiny] {
        for output in [OutputKind::Sigmoid, OutputKind::Tree] {
            let cfg = ModelConfig::new(arch, output);
            let (model, _vm) = build(&cfg);
            let y = model.forward_t(&images(4, 106), false).unwrap();
            assert_eq!(y.dims(), &[4, N_ANSWERS]);
            assert_eq!(y.dtype(), DType::F32);
            for row in rows(&y) {
                assert!(
                    row.iter().all(|p| p.is_finite() && (0.0..=1.0).contains(p)),
                    "{arch}/{output}: {row:?}"
                );
                if output == OutputKind::Tree {
                    let v = gz_schema::check_row(&row, 1e-5);
                    assert!(v.is_empty(), "{arch}: {v:?}");
                }
            }
        }
    }
}

#[test]
fn tiny_accepts_other_sizes_and_dtypes_and_rejects_wrong_inputs() {
    let cfg = ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid).with_input_size(32);
    let (model, _vm) = build(&cfg);
    let x = images(2, 32);
    let y32 = model.forward_t(&x, false).unwrap();
    let y64 = model.forward_t(&x.to_dtype(DType::F64).unwrap(), false).unwrap();
    let d = (&y32 - &y64)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .max_keepdim(0)
        .unwrap();
    assert!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] < 1e-6);
    let e = model.forward_t(&images(2, 106), false).unwrap_err().to_string();
    assert!(e.contains("3×32×32") && e.contains("106"), "{e}");
    assert!(model
        .forward_t(&Tensor::zeros((2, 32, 32), DType::F32, &Device::Cpu).unwrap(), false)
        .is_err());
}

#[test]
fn dropout_only_in_training_and_seeded() {
    let cfg = ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid)
        .with_input_size(32)
        .with_dropout(0.5);
    let (model, _vm) = build(&cfg);
    let x = images(3, 32);
    let as_vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e1 = as_vec(model.forward_t(&x, false).unwrap());
    let e2 = as_vec(model.forward_t(&x, false).unwrap());
    assert_eq!(e1, e2, "eval mode is deterministic");
    model.set_dropout_seed(42).unwrap();
    let state = model.dropout_state();
    let t1 = as_vec(model.forward_t(&x, true).unwrap());
    let t2 = as_vec(model.forward_t(&x, true).unwrap());
    assert_ne!(t1, e1, "dropout changes training outputs");
    assert_ne!(t1, t2, "fresh masks each step");
    model.set_dropout_state(state).unwrap();
    assert_eq!(
        as_vec(model.forward_t(&x, true).unwrap()),
        t1,
        "restored RNG state repeats the masks"
    );
    model.set_dropout_seed(42).unwrap();
    assert_eq!(as_vec(model.forward_t(&x, true).unwrap()), t1, "same seed, same masks");
}

#[test]
fn gradients_reach_every_parameter_of_the_tiny_nets() {
    for arch in [Arch::Tiny, Arch::DielemanTiny] {
        let cfg = ModelConfig::new(arch, OutputKind::Tree)
            .with_input_size(48)
            .with_dropout(0.0);
        let (model, varmap) = build(&cfg);
        let y = model.forward_t(&images(2, 48), true).unwrap();
        let target = Tensor::full(0.1f32, (2, N_ANSWERS), &Device::Cpu).unwrap();
        let loss = (y - target).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for var in varmap.all_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch}: no gradient for a variable of shape {:?}", var.dims()));
            let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(n.is_finite(), "{arch}: non-finite gradient");
        }
    }
}
