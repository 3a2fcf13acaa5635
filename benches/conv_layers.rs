//! Per-layer profile of the native CPU engine: the median time and GFLOP/s of every 3x3 conv
//! shape the presets use, through the kernel the engine picks (direct, Winograd F(2x2) or F(4x4), or
//! im2col + GEMM). `wae-edge bench --layers` times the same convs inside a network.
//!     cargo bench --bench conv_layers
use wae_edge::cpu::time_conv3;

fn main() {
    // (side, cin, cout, stride, what)
    let shapes = [
        (28, 1, 16, 1, "fashion encoder conv0"),
        (28, 16, 2, 2, "fashion encoder split (I_L + I_H)"),
        (14, 1, 64, 1, "fashion-wae backbone s0c0"),
        (14, 64, 64, 1, "fashion-wae backbone s0c1"),
        (7, 64, 128, 1, "fashion-wae backbone s1c0"),
        (7, 128, 128, 1, "fashion-wae backbone s1c1"),
        (4, 128, 256, 1, "fashion-wae backbone s2c0"),
        (14, 16, 16, 1, "fashion-wae branch s0c1"),
        (14, 1, 32, 1, "fashion-wae-small backbone s0c0"),
        (14, 32, 32, 1, "fashion-wae-small backbone s0c1"),
        (7, 32, 64, 1, "fashion-wae-small backbone s1c0"),
        (7, 64, 64, 1, "fashion-wae-small backbone s1c1"),
        (4, 64, 128, 1, "fashion-wae-small backbone s2c0"),
        (14, 8, 8, 1, "fashion-wae-small branch s0c1"),
        (224, 3, 16, 1, "wae-vgg16 encoder conv0"),
        (224, 16, 16, 1, "wae-vgg16 encoder conv1-2"),
        (224, 16, 6, 2, "wae-vgg16 encoder split"),
        (112, 16, 16, 1, "wae-vgg16 branch s0c1"),
        (56, 32, 32, 1, "wae-vgg16 branch s1c1"),
        (112, 3, 64, 1, "wae-vgg16 backbone s0c0"),
        (112, 64, 64, 1, "wae-vgg16 backbone s0c1"),
        (56, 128, 128, 1, "wae-vgg16 backbone s1c1"),
        (28, 256, 256, 1, "wae-vgg16 backbone s2"),
        (14, 512, 512, 1, "wae-vgg16 backbone s3"),
        (7, 512, 512, 1, "wae-vgg16 backbone s4"),
        (224, 64, 64, 1, "vgg16 s0c1"),
        (112, 128, 128, 1, "vgg16 s1c1"),
        (56, 256, 256, 1, "vgg16 s2"),
        (28, 512, 512, 1, "vgg16 s3"),
        (14, 512, 512, 1, "vgg16 s4"),
    ];
    println!(
        "{:<36} {:>22} {:>10} {:>9}",
        "layer", "shape", "p50 us", "GFLOP/s"
    );
    for (h, cin, cout, stride, what) in shapes {
        let iters = if h >= 56 { 20 } else { 2000 };
        let t = time_conv3(h, cin, cout, stride, iters);
        let o = (h - 1) / stride + 1;
        let flop = 2.0 * (o * o * 9 * cin * cout) as f64;
        println!(
            "{what:<36} {:>22} {:>10.1} {:>9.1}",
            format!("{h}x{h} {cin}->{cout} /{stride}"),
            t.as_secs_f64() * 1e6,
            flop / t.as_secs_f64() / 1e9
        );
    }
}
