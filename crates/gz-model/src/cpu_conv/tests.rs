//! gz's CPU convolution against candle's: the forward pass against `conv2d`, both gradients
//! against candle's autograd of `conv2d` (which is what the nets trained with before), on the
//! nets' kinds of shapes and the awkward ones: stride 2 with sides the stride does not divide
//! (input rows no output reads), padding larger than the kernel's half, non-square inputs and
//! kernels, 1×1 kernels (no im2col), a single image (the product itself threaded).

use candle_core::{DType, Device, Result, Tensor, Var};

use super::winograd::Tiles;
use super::*;

fn rnd(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let z = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9)) >> 40;
            (z as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Largest |a − b| relative to the largest |b| (at least 1).
fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let m = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    Ok(d / m)
}

/// (n, c, h, w, k, kh, kw, padding, stride)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: [Case; 10] = [
    (4, 3, 20, 20, 8, 3, 3, 1, 1),
    (3, 5, 11, 9, 4, 3, 3, 1, 2),
    (2, 4, 8, 8, 6, 3, 3, 1, 2),
    (2, 6, 9, 7, 5, 5, 3, 2, 1),
    (2, 3, 12, 12, 4, 6, 6, 0, 1),
    (5, 8, 6, 6, 7, 1, 1, 0, 1),
    (2, 8, 7, 7, 3, 1, 1, 0, 2),
    (1, 16, 13, 13, 12, 3, 3, 1, 1),
    (9, 2, 5, 5, 3, 3, 3, 3, 1),
    (3, 2, 4, 6, 2, 4, 6, 0, 1),
];

#[test]
fn matches_candle_forward_and_gradients() -> Result<()> {
    for (i, &(n, c, h, w, k, kh, kw, padding, stride)) in CASES.iter().enumerate() {
        let x = Var::from_tensor(&rnd((n, c, h, w), 3 * i as u64 + 1)?)?;
        let wt = Var::from_tensor(&rnd((k, c, kh, kw), 3 * i as u64 + 2)?)?;
        let b = rnd((1, k, 1, 1), 3 * i as u64 + 3)?.flatten_all()?;
        // candle: forward, and both gradients of Σ y ⊙ r through its autograd
        let y_ref = x.as_tensor().conv2d(wt.as_tensor(), padding, stride, 1, 1)?;
        let (_, _, oh, ow) = y_ref.dims4()?;
        let r = rnd((n, k, oh, ow), 1000 + i as u64)?;
        let grads = (&y_ref * &r)?.sum_all()?.backward()?;
        let dx_ref = grads.get(x.as_tensor()).expect("dx");
        let dw_ref = grads.get(wt.as_tensor()).expect("dw");
        let y_ref = y_ref.broadcast_add(&b.reshape((1, k, 1, 1))?)?;

        let what = format!("case {i} {:?}", CASES[i]);
        let y = conv2d(x.as_tensor(), wt.as_tensor(), Some(&b), padding, stride)?.expect("f32 on the CPU");
        assert!(rel(&y, &y_ref)? < 1e-5, "{what}: forward off by {}", rel(&y, &y_ref)?);
        let dx = conv2d_backward_data(&r, wt.as_tensor(), (h, w), padding, stride)?.expect("applies");
        if h == dx_ref.dim(2)? && w == dx_ref.dim(3)? {
            assert!(rel(&dx, dx_ref)? < 1e-5, "{what}: dx off by {}", rel(&dx, dx_ref)?);
        } else {
            // candle's own backward returns a smaller dx when the stride leaves rows unread
            // (docs/cudnn.md); compare the part it has, and the rest must be zero
            let (rh, rw) = (dx_ref.dim(2)?, dx_ref.dim(3)?);
            let part = dx.narrow(2, 0, rh)?.narrow(3, 0, rw)?;
            assert!(rel(&part, dx_ref)? < 1e-5, "{what}: dx off by {}", rel(&part, dx_ref)?);
            let total = dx.abs()?.sum_all()?.to_scalar::<f32>()?;
            let kept = part.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                (total - kept).abs() <= 1e-6 * total.max(1.0),
                "{what}: unread rows got gradient"
            );
        }
        let dw = conv2d_backward_filter(x.as_tensor(), &r, (kh, kw), padding, stride)?.expect("applies");
        assert!(rel(&dw, dw_ref)? < 1e-5, "{what}: dw off by {}", rel(&dw, dw_ref)?);
    }
    Ok(())
}

/// A finite-difference check that does not lean on candle: perturbing one input value and one
/// weight changes Σ y ⊙ r by what the gradients say (f32, so a loose tolerance).
#[test]
fn gradients_agree_with_finite_differences() -> Result<()> {
    let g = Geometry {
        n: 2,
        c: 3,
        h: 7,
        w: 6,
        k: 4,
        kh: 3,
        kw: 3,
        padding: 1,
        stride: 2,
    };
    let x = values(&rnd((g.n, g.c, g.h, g.w), 7)?)?;
    let w = values(&rnd((g.k, g.c, g.kh, g.kw), 8)?)?;
    let r = values(&rnd((g.n, g.k, g.oh(), g.ow()), 9)?)?;
    let loss = |x: &[f32], w: &[f32]| -> Result<f64> {
        let y = forward(&g, x, w, None)?;
        Ok(y.iter().zip(&r).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum())
    };
    let dx = backward_data(&g, &r, &w)?;
    let dw = backward_filter(&g, &x, &r)?;
    let eps = 1e-2f32;
    for i in [0, 5, 17, 40, x.len() - 1] {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += eps;
        xm[i] -= eps;
        let fd = (loss(&xp, &w)? - loss(&xm, &w)?) / (2.0 * f64::from(eps));
        assert!(
            (fd - f64::from(dx[i])).abs() < 1e-3,
            "dx[{i}]: {} vs finite difference {fd}",
            dx[i]
        );
    }
    for i in [0, 3, 26, 50, w.len() - 1] {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[i] += eps;
        wm[i] -= eps;
        let fd = (loss(&x, &wp)? - loss(&x, &wm)?) / (2.0 * f64::from(eps));
        assert!(
            (fd - f64::from(dw[i])).abs() < 1e-3,
            "dw[{i}]: {} vs finite difference {fd}",
            dw[i]
        );
    }
    Ok(())
}

/// The same result to the bit on 1 and 3 threads (a fixed summation order), and for a batch
/// computed whole or image by image (the forward pass and dx are per image).
#[test]
fn results_do_not_depend_on_threads() -> Result<()> {
    let g = Geometry {
        n: 11,
        c: 4,
        h: 9,
        w: 9,
        k: 5,
        kh: 3,
        kw: 3,
        padding: 1,
        stride: 1,
    };
    same_on_any_threads(g)?;
    // Winograd's sizes (forward and input gradient), the batch in one group
    let wg = Geometry { c: 16, k: 16, ..g };
    assert!(winograd::applies(&wg));
    assert_eq!(winograd::pick(&wg), Tiles::Two);
    same_on_any_threads(wg)?;
    // and with 4×4 tiles
    let wg4 = Geometry { h: 12, w: 12, ..wg };
    assert_eq!(winograd::pick(&wg4), Tiles::Four);
    same_on_any_threads(wg4)
}

/// The direct kernels (valid stride-1 layers with few output channels: Dieleman's image layer)
/// give the im2col path's forward pass and filter gradient, in AVX2 + FMA and portable alike,
/// on shapes that reach every edge of their loops: an odd channel count (a strip of one
/// channel), filter widths the taps' blocks do not divide, rows with and without whole strips
/// and scalar columns, output rows the row blocks do not divide; and on any number of threads.
#[test]
fn direct_kernels_match_im2col() -> Result<()> {
    let shapes = [
        // (n, c, h, w, k, kh, kw): Dieleman's image layer (40 × 40: one strip a row, rows in
        // blocks of 20 and 20, filter columns one block of 6)
        (3, 3, 45, 45, 8, 6, 6),
        // 43 columns (a strip of 40, then 3 alone), 48 rows (blocks of 20, 20, 8), 7 channels
        // (3 pairs and one), filter columns 3 + 1 + 1
        (2, 2, 50, 47, 7, 3, 5),
        // 16 columns (two vectors, no strip), 5 channels, filter columns 3 + 1
        (3, 3, 21, 19, 5, 6, 4),
        // one channel in and out, 10 columns (a vector and 2 alone)
        (2, 1, 12, 12, 1, 3, 3),
        // 50 columns (a strip, a vector, 2 alone), filter columns 6 + 3
        (2, 2, 20, 58, 8, 3, 9),
        // 17 images (chunks of 3 in the filter gradient), filter columns 6 + 1, 24 columns
        (17, 3, 30, 30, 3, 7, 7),
    ];
    for (i, &(n, c, h, w, k, kh, kw)) in shapes.iter().enumerate() {
        let g = Geometry {
            n,
            c,
            h,
            w,
            k,
            kh,
            kw,
            padding: 0,
            stride: 1,
        };
        assert!(direct::applies(&g), "{g:?}");
        let x = values(&rnd((n, c, h, w), 40 + i as u64)?)?;
        let wt = values(&rnd((k, c, kh, kw), 50 + i as u64)?)?;
        let b = values(&rnd((1, 1, 1, k), 60 + i as u64)?)?;
        let dy = values(&rnd((n, k, g.oh(), g.ow()), 70 + i as u64)?)?;
        let close = |a: &[f32], r: &[f32], what: &str| {
            assert_eq!(a.len(), r.len());
            let m = r.iter().fold(1f32, |m, v| m.max(v.abs()));
            let d = a.iter().zip(r).fold(0f32, |d, (a, r)| d.max((a - r).abs()));
            // (sums of up to 1,800 products in another order: rounding reaches 2e-5 of the
            // largest; a wrong index is off by the size of the values)
            assert!(d / m < 1e-4, "{what} {g:?}: {d} of {m}");
        };
        let y_ref = forward_im2col(&g, &x, &wt, Some(&b));
        let dw_ref = backward_filter_im2col(&g, &x, &dy);
        for fast in [false, crate::cpu_features::avx2_fma()] {
            close(
                &direct::forward_with(fast, &g, &x, &wt, Some(&b)),
                &y_ref,
                &format!("forward (fast {fast})"),
            );
            close(
                &direct::backward_filter_with(fast, &g, &x, &dy),
                &dw_ref,
                &format!("filter gradient (fast {fast})"),
            );
        }
        // the intrinsics are the portable loops with FMA, to the bit (first image)
        let one = Geometry { n: 1, ..g };
        let (chw, kohw) = (c * h * w, k * g.oh() * g.ow());
        if let Some([portable, vector]) = direct::both_ways(&one, &x[..chw], &wt, &b, &dy[..kohw]) {
            assert!(
                portable == vector,
                "{g:?}: the intrinsics differ from the portable loops"
            );
        }
        same_on_any_threads(g)?;
    }
    // the direct kernels stop where gemm's tiles fill: 16 output channels, padding, stride
    let g = Geometry {
        n: 1,
        c: 3,
        h: 45,
        w: 45,
        k: 16,
        kh: 6,
        kw: 6,
        padding: 0,
        stride: 1,
    };
    assert!(!direct::applies(&g));
    assert!(!direct::applies(&Geometry { k: 8, padding: 1, ..g }));
    assert!(!direct::applies(&Geometry { k: 8, stride: 2, ..g }));
    Ok(())
}

fn same_on_any_threads(g: Geometry) -> Result<()> {
    let x = values(&rnd((g.n, g.c, g.h, g.w), 21)?)?;
    let w = values(&rnd((g.k, g.c, g.kh, g.kw), 22)?)?;
    let dy = values(&rnd((g.n, g.k, g.oh(), g.ow()), 23)?)?;
    let run = |threads: usize| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| {
            Ok((
                forward(&g, &x, &w, None)?,
                backward_data(&g, &dy, &w)?,
                backward_filter(&g, &x, &dy)?,
            ))
        })
    };
    let one = run(1)?;
    assert_eq!(one, run(3)?, "1 vs 3 threads");
    let chw = g.c * g.h * g.w;
    let single = Geometry { n: 1, ..g };
    let first = forward(&single, &x[..chw], &w, None)?;
    assert_eq!(first, one.0[..first.len()], "image 0 alone vs in the batch");
    Ok(())
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let g = Geometry {
        n: 1,
        c: 2,
        h: 2,
        w: 2,
        k: 1,
        kh: 5,
        kw: 5,
        padding: 0,
        stride: 1,
    };
    assert!(
        forward(&g, &[0.0; 8], &[0.0; 50], None).is_err(),
        "kernel larger than the input"
    );
    for empty in [
        Geometry { c: 0, ..g },
        Geometry { k: 0, ..g },
        Geometry { h: 0, padding: 3, ..g },
    ] {
        assert!(forward(&empty, &[], &[], None).is_err(), "{empty:?}");
    }
    let huge = Geometry {
        padding: usize::MAX / 2,
        ..g
    };
    assert!(backward_data(&huge, &[], &[0.0; 50]).is_err(), "padding overflow");
    let g = Geometry { kh: 1, kw: 1, ..g };
    assert!(forward(&g, &[0.0; 7], &[0.0; 2], None).is_err(), "short input");
    assert!(backward_filter(&g, &[0.0; 8], &[0.0; 3],).is_err(), "short gradient");
    let g = Geometry { stride: 0, ..g };
    assert!(backward_data(&g, &[0.0; 4], &[0.0; 2]).is_err(), "stride 0");
}

/// Other dtypes leave the work to candle (the switch is process-wide, so it is not flipped here:
/// tests running alongside rely on it).
#[test]
fn only_f32_on_the_cpu_when_enabled() -> Result<()> {
    let x = rnd((1, 2, 5, 5), 1)?;
    let w = rnd((3, 2, 3, 3), 2)?;
    assert!(conv2d(&x.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, None, 1, 1)?.is_none());
    assert!(conv2d(&x, &w, None, 1, 1)?.is_some());
    Ok(())
}

/// The op entry points read the op's storage in place: a view with a start offset gives the same
/// result as a fresh contiguous tensor, and a strided view is left to candle (`None`).
#[test]
fn storage_entry_points_honour_offsets_and_refuse_strides() -> Result<()> {
    let (n, c, h, w, k) = (2, 3, 6, 5, 4);
    let whole = rnd((n + 1, c, h, w), 31)?;
    let x = whole.narrow(0, 1, n)?; // contiguous, at an offset into the storage
    let wt = rnd((k, c, 3, 3), 32)?;
    let b = rnd((1, k, 1, 1), 33)?.flatten_all()?;
    let y_ref = conv2d(&x.contiguous()?, &wt, Some(&b), 1, 1)?.expect("f32");
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = wt.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let (ys, shape) = match (&*xs, &*ws, &*bs) {
        (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(ws), candle_core::Storage::Cpu(bs)) => {
            assert!(xl.start_offset() > 0, "the test needs an offset view");
            forward_storage((xs, xl), (ws, wl), Some((bs, bl)), 1, 1)?.expect("contiguous f32 applies")
        }
        _ => unreachable!("CPU tensors"),
    };
    let y = Tensor::from_vec(ys.as_slice::<f32>()?.to_vec(), shape, &Device::Cpu)?;
    assert_eq!(values(&y)?, values(&y_ref)?, "offset view");
    let strided = whole.narrow(0, 1, n)?.transpose(2, 3)?;
    let (ss, sl) = strided.storage_and_layout();
    if let (candle_core::Storage::Cpu(ss), candle_core::Storage::Cpu(ws)) = (&*ss, &*ws) {
        assert!(
            forward_storage((ss, sl), (ws, wl), None, 1, 1)?.is_none(),
            "strided view"
        );
    }
    Ok(())
}

/// The kernel table of `docs/benchmarks.md` ("Training on CPU"): one call each of candle's CPU
/// convolution, input gradient (`conv_transpose2d`) and filter gradient (the transposed
/// convolution candle's autograd runs) against gz's, on the nets' layer shapes, GFLOP/s of
/// 2·N·K·C·9·H·W. Run by hand:
/// `cargo test --release -p gz-model --lib cpu_conv::tests::bench_kernels -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture (release)"]
fn bench_kernels() -> Result<()> {
    fn time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let t = std::time::Instant::now();
        for _ in 0..3 {
            f()?;
        }
        Ok(t.elapsed().as_secs_f64() / 3.0)
    }
    println!(
        "layer (C -> K, side)   candle fwd  gz fwd  F2x2  im2col  candle dx  gz dx  F2x2  im2col  candle dw  gz dw  F2x2  im2col   (GFLOP/s)"
    );
    for (i, &(c, side, k)) in [
        (64, 106, 64),
        (64, 53, 64),
        (128, 53, 128),
        (128, 26, 128),
        (256, 26, 256),
        (3, 106, 32),
        (256, 13, 256),
        (512, 13, 512),
        (512, 6, 512),
    ]
    .iter()
    .enumerate()
    {
        let n = 16;
        let x = rnd((n, c, side, side), 2 * i as u64 + 1)?;
        let w = rnd((k, c, 3, 3), 2 * i as u64 + 2)?;
        let dy = rnd((n, k, side, side), 2 * i as u64 + 3)?;
        let flop = 2.0 * (n * k * c * 9 * side * side) as f64;
        let rate = |s: f64| flop / s / 1e9;
        let cf = time(|| x.conv2d(&w, 1, 1, 1, 1).map(drop))?;
        // gz's three passes: as configured (Winograd with the tiles `pick` chooses), with
        // F(2×2, 3×3) only, and with Winograd off (im2col + product)
        let passes = || -> Result<[f64; 3]> {
            Ok([
                time(|| conv2d(&x, &w, None, 1, 1).map(drop))?,
                time(|| conv2d_backward_data(&dy, &w, (side, side), 1, 1).map(drop))?,
                time(|| conv2d_backward_filter(&x, &dy, (3, 3), 1, 1).map(drop))?,
            ])
        };
        let [gf, gx, gw] = passes()?;
        set_winograd_large_tiles(false);
        let [gf2, gx2, gw2] = passes()?;
        set_winograd_large_tiles(true);
        set_winograd(false);
        let [gi, gxi, gwi] = passes()?;
        set_winograd(true);
        let cx = time(|| dy.conv_transpose2d(&w, 1, 0, 1, 1).map(drop))?;
        let cw = time(|| {
            x.transpose(0, 1)?
                .conv2d(&dy.transpose(0, 1)?.contiguous()?, 1, 1, 1, 1)
                .map(drop)
        })?;
        println!(
            "{c:>4} -> {k:<4} {side:>4}      {:>8.0} {:>7.0} {:>5.0} {:>7.0} {:>10.0} {:>6.0} {:>5.0} {:>7.0} {:>10.0} {:>6.0} {:>5.0} {:>7.0}",
            rate(cf),
            rate(gf),
            rate(gf2),
            rate(gi),
            rate(cx),
            rate(gx),
            rate(gx2),
            rate(gxi),
            rate(cw),
            rate(gw),
            rate(gw2),
            rate(gwi)
        );
    }
    Ok(())
}

/// Winograd F(2×2, 3×3) and F(4×4, 3×3) against the im2col forward and candle's `conv2d`: padding 0 and 1, odd
/// output sides (partial tiles), one group of several images and uneven groups, with a bias.
#[test]
fn winograd_matches_the_direct_forward() -> Result<()> {
    let (mut applied, mut large) = (0, 0);
    // (n, c, h, w, k, padding)
    for (i, &(n, c, h, w, k, padding)) in [
        (3, 16, 13, 11, 20, 1),
        (2, 32, 8, 8, 16, 0),
        (5, 16, 6, 6, 16, 1),
        (9, 24, 20, 20, 16, 1),
        (1, 16, 3, 3, 16, 0),
        (2, 16, 9, 9, 16, 3),   // padding 3: the input gradient takes im2col (no negative padding)
        (3, 16, 15, 17, 24, 1), // 4×4 tiles (partial ones at the right)
        (2, 16, 33, 35, 16, 1), // longer tile rows, both sizes
    ]
    .iter()
    .enumerate()
    {
        let g = Geometry {
            n,
            c,
            h,
            w,
            k,
            kh: 3,
            kw: 3,
            padding,
            stride: 1,
        };
        // the entry points below take Winograd where it applies, im2col elsewhere; the
        // Winograd functions are called directly on every case
        applied += usize::from(winograd::applies(&g));
        let x = values(&rnd((n, c, h, w), 50 + i as u64)?)?;
        let wt = values(&rnd((k, c, 3, 3), 60 + i as u64)?)?;
        let b = values(&rnd((1, 1, 1, k), 70 + i as u64)?)?;
        let direct = forward_im2col(&g, &x, &wt, Some(&b));
        let scale = direct.iter().fold(1f32, |m, v| m.max(v.abs()));
        // both tile sizes on every case (the larger tiles round a little more)
        for (tiles, bound) in [(Tiles::Two, 2e-6), (Tiles::Four, 5e-5)] {
            let fast = winograd::forward_in(tiles, &g, &x, &wt, Some(&b));
            let worst = fast.iter().zip(&direct).fold(0f32, |m, (a, d)| m.max((a - d).abs()));
            assert!(
                worst / scale < bound,
                "case {i}, {tiles:?}: winograd off by {worst} (scale {scale})"
            );
        }
        // and the public entry point takes it, against candle
        let xt = Tensor::from_vec(x, (n, c, h, w), &Device::Cpu)?;
        let wt = Tensor::from_vec(wt, (k, c, 3, 3), &Device::Cpu)?;
        let bt = Tensor::from_vec(b, k, &Device::Cpu)?;
        let y = conv2d(&xt, &wt, Some(&bt), padding, 1)?.expect("f32 on the CPU");
        let y_ref = xt
            .conv2d(&wt, padding, 1, 1, 1)?
            .broadcast_add(&bt.reshape((1, k, 1, 1))?)?;
        // F(4×4, 3×3) rounds more (its transforms multiply by up to 8 and divide by 24)
        let loose = if winograd::applies(&g) && winograd::pick(&g) == Tiles::Four {
            25.0
        } else {
            1.0
        };
        assert!(
            rel(&y, &y_ref)? < 2e-6 * loose,
            "case {i}: forward off by {}",
            rel(&y, &y_ref)?
        );
        // the input gradient (the flipped-filter convolution) against candle's autograd
        let xv = Var::from_tensor(&xt)?;
        let yv = xv.as_tensor().conv2d(&wt, padding, 1, 1, 1)?;
        let r = rnd(yv.dims4()?, 80 + i as u64)?;
        let grads = (&yv * &r)?.sum_all()?.backward()?;
        let dx_ref = grads.get(xv.as_tensor()).expect("dx");
        let dx = conv2d_backward_data(&r, &wt, (h, w), padding, 1)?.expect("applies");
        assert!(
            rel(&dx, dx_ref)? < 2e-6 * loose,
            "case {i}: dx off by {}",
            rel(&dx, dx_ref)?
        );
        // the filter gradient against candle's autograd and against im2col's
        let wv = Var::from_tensor(&wt)?;
        let grads = (&xt.conv2d(wv.as_tensor(), padding, 1, 1, 1)? * &r)?
            .sum_all()?
            .backward()?;
        let dw_ref = grads.get(wv.as_tensor()).expect("dw");
        let dw = conv2d_backward_filter(&xt, &r, (3, 3), padding, 1)?.expect("applies");
        assert!(
            rel(&dw, dw_ref)? < 2e-6 * loose.max(5.0),
            "case {i}: dw off by {}",
            rel(&dw, dw_ref)?
        );
        // Winograd's filter gradient itself, both tile sizes, also on the small outputs that
        // keep im2col
        for (tiles, bound) in [(Tiles::Two, 1e-5), (Tiles::Four, 2e-5)] {
            let direct = Tensor::from_vec(
                winograd::backward_filter_in(tiles, &g, &values(&xt)?, &values(&r)?),
                (k, c, 3, 3),
                &Device::Cpu,
            )?;
            assert!(
                rel(&direct, dw_ref)? < bound,
                "case {i}, {tiles:?}: winograd dw off by {}",
                rel(&direct, dw_ref)?
            );
        }
        large += usize::from(winograd::applies(&g) && winograd::pick(&g) == Tiles::Four);
    }
    assert_eq!(applied, 5, "five cases have outputs of at least 7×7");
    assert_eq!(large, 3, "three of them are wide enough for 4×4 tiles");
    // stride 2 never takes Winograd (forward or input gradient)
    let (n, c, h, w, k) = (2, 16, 9, 9, 16);
    let xv = Var::from_tensor(&rnd((n, c, h, w), 90)?)?;
    let wt = rnd((k, c, 3, 3), 91)?;
    let yv = xv.as_tensor().conv2d(&wt, 1, 2, 1, 1)?;
    let y = conv2d(xv.as_tensor(), &wt, None, 1, 2)?.expect("f32 on the CPU");
    assert!(rel(&y, &yv)? < 1e-5);
    let r = rnd(yv.dims4()?, 92)?;
    let grads = (&yv * &r)?.sum_all()?.backward()?;
    let dx_ref = grads.get(xv.as_tensor()).expect("dx");
    let dx = conv2d_backward_data(&r, &wt, (h, w), 1, 2)?.expect("applies");
    assert_eq!(dx.dims(), dx_ref.dims());
    assert!(rel(&dx, dx_ref)? < 1e-5, "stride 2: dx off by {}", rel(&dx, dx_ref)?);
    Ok(())
}

/// F(2×2, 3×3) against F(4×4, 3×3) on the nets' layer shapes, forward and filter gradient,
/// interleaved, best of 7 (`cargo test --release -p gz-model --lib
/// The product blocks' spacing: at least the block, whole cache lines, an odd number of them
/// (so a multiple of 4 KiB never comes out, e.g. for 256 × 392 values).
#[test]
fn winograd_blocks_spread_over_cache_sets() {
    for n in [1, 15, 16, 17, 32, 256 * 392, 128 * 1568, 64 * 5832, 1000] {
        let s = winograd::spread(n);
        assert!(s >= n && s < n + 48, "{n} -> {s}");
        assert_eq!(s % 16, 0, "{n} -> {s}");
        assert_eq!((s / 16) % 2, 1, "{n} -> {s}");
    }
}

/// cpu_conv::tests::bench_winograd_tiles -- --ignored --nocapture`).
#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture (release)"]
fn bench_winograd_tiles() -> Result<()> {
    println!("layer (C -> K, side, n)   fwd F2x2  F4x4   dw F2x2  F4x4   (ms, best of 7)  pick");
    for (i, &(c, side, k, n)) in [
        (64, 106, 64, 8),
        (128, 53, 128, 8),
        (64, 53, 64, 16),
        (256, 26, 256, 8),
        (128, 26, 128, 16),
        (512, 13, 512, 8),
        (256, 13, 256, 16),
        (32, 20, 64, 128),
    ]
    .iter()
    .enumerate()
    {
        let g = Geometry {
            n,
            c,
            h: side,
            w: side,
            k,
            kh: 3,
            kw: 3,
            padding: 1,
            stride: 1,
        };
        let x = values(&rnd((n, c, side, side), 2 * i as u64 + 1)?)?;
        let w = values(&rnd((k, c, 3, 3), 2 * i as u64 + 2)?)?;
        let dy = values(&rnd((n, k, side, side), 2 * i as u64 + 3)?)?;
        let mut best = [f64::MAX; 4];
        for _ in 0..7 {
            for (j, tiles) in [Tiles::Two, Tiles::Four].into_iter().enumerate() {
                let t = std::time::Instant::now();
                drop(winograd::forward_in(tiles, &g, &x, &w, None));
                best[j] = best[j].min(t.elapsed().as_secs_f64() * 1e3);
                let t = std::time::Instant::now();
                drop(winograd::backward_filter_in(tiles, &g, &x, &dy));
                best[2 + j] = best[2 + j].min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        println!(
            "{c:>4} -> {k:<4} {side:>4} {n:>4}   {:>8.1} {:>5.1}   {:>7.1} {:>5.1}   {:?}",
            best[0],
            best[1],
            best[2],
            best[3],
            winograd::pick(&g)
        );
    }
    Ok(())
}

/// gz's three passes on the Dieleman towers' layer shapes (valid convolutions, 16 parts per
/// galaxy, 16 galaxies: 256 parts), milliseconds per call. Run by hand:
/// `cargo test --release -p gz-model --lib cpu_conv::tests::bench_dieleman_tower -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture (release)"]
fn bench_dieleman_tower() -> Result<()> {
    fn time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best * 1e3)
    }
    println!("net            layer (C -> K, side, k)   fwd ms   dx ms   dw ms");
    let mut total = [0.0; 3];
    for (net, layers) in [
        (
            "dieleman-tiny",
            [(3, 45, 8, 6), (8, 20, 16, 5), (16, 8, 32, 3), (32, 6, 32, 3)],
        ),
        (
            "dieleman",
            [(3, 45, 32, 6), (32, 20, 64, 5), (64, 8, 128, 3), (128, 6, 128, 3)],
        ),
    ] {
        for (i, &(c, side, k, ks)) in layers.iter().enumerate() {
            let n = 256;
            let o = side + 1 - ks;
            let x = rnd((n, c, side, side), 2 * i as u64 + 1)?;
            let w = rnd((k, c, ks, ks), 2 * i as u64 + 2)?;
            let dy = rnd((n, k, o, o), 2 * i as u64 + 3)?;
            let f = time(|| conv2d(&x, &w, None, 0, 1).map(drop))?;
            let dx = time(|| conv2d_backward_data(&dy, &w, (side, side), 0, 1).map(drop))?;
            let dw = time(|| conv2d_backward_filter(&x, &dy, (ks, ks), 0, 1).map(drop))?;
            if net == "dieleman-tiny" {
                total[0] += f;
                total[1] += dx;
                total[2] += dw;
            }
            println!("{net:<14} {c:>4} -> {k:<4} {side:>3} {ks}x{ks}        {f:>7.2} {dx:>7.2} {dw:>7.2}");
        }
    }
    println!(
        "dieleman-tiny total            {:>7.2} {:>7.2} {:>7.2}",
        total[0], total[1], total[2]
    );
    Ok(())
}
