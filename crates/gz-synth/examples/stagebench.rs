//! `stagebench`: CPU cost of the stages of one synthetic image (scene + labels, rendering, JPEG),
//! single-threaded, over 200 galaxies. `cargo run --release -p gz-synth --example stagebench`;
//! wrap in `perf stat -e task-clock` on a loaded machine (wall times then overstate the cost).

use rand::SeedableRng;

fn main() {
    use std::time::Instant;
    let n = 200;
    let (mut ts, mut tr, mut tj) = (0f64, 0f64, 0f64);
    let mut bytes = 0usize;
    for i in 0..n {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i);
        let t = Instant::now();
        let scene = gz_synth::galaxy::Scene::sample(&mut rng);
        std::hint::black_box(scene.answer_probs());
        ts += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let rgb = gz_synth::render::render_rgb(&scene);
        tr += t.elapsed().as_secs_f64();
        let t = Instant::now();
        match gz_synth::render::encode_jpeg(&rgb) {
            Ok(j) => bytes += j.len(),
            Err(e) => eprintln!("galaxy {i}: {e}"),
        }
        tj += t.elapsed().as_secs_f64();
    }
    let ms = |t: f64| t * 1e3 / n as f64;
    println!(
        "per image (wall ms): scene+labels {:.3}, render {:.3}, jpeg {:.3}; mean JPEG {:.1} kB",
        ms(ts),
        ms(tr),
        ms(tj),
        bytes as f64 / n as f64 / 1e3
    );
}
