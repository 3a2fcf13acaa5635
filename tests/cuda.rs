//! The CUDA engine on a real GPU (`--features cuda`; `scripts/device_check.sh` runs these on
//! the GPU machine). Without a CUDA device each test says so and returns.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use wae_edge::classifier::{Engine, EngineKind};
use wae_edge::gpu::direct_conv::DirectConv;
use wae_edge::gpu::gemm_conv;
use wae_edge::gpu::{Execution, GraphMode};
use wae_edge::weights::ModelFile;
use wae_edge::Classifier;

const WAE: &str = "models/fashion-wae/model.safetensors";
const PLAIN: &str = "models/fashion-plain/model.safetensors";

fn gpu() -> Option<Device> {
    match wae_edge::device::select(wae_edge::device::DeviceRequest::Cuda) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn engine(path: &str, dev: &Device, mode: GraphMode) -> Engine {
    Engine::build_with(ModelFile::open(path).unwrap(), dev, EngineKind::Auto, mode).unwrap()
}

/// A seeded normalised batch on the CPU, rounded to f16 as the GPU engine sees it.
fn batch(n: usize) -> Tensor {
    Tensor::randn(0f32, 1., (n, 1, 28, 28), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A conv on the GPU in f16 against the same conv on the CPU in f32: max |diff| / max |want|.
fn gpu_against_cpu(
    dev: &Device,
    (x, w, b): (&Tensor, &Tensor, &Tensor),
    conv: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> f32 {
    let want = conv(x, w, b);
    let on = |t: &Tensor| t.to_dtype(DType::F16).unwrap().to_device(dev).unwrap();
    let got = conv(&on(x), &on(w), &on(b))
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    assert_eq!(got.dims(), want.dims());
    max_abs(&(got - &want).unwrap()) / max_abs(&want)
}

fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let top = b.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / top
}

#[test]
fn graph_and_eager_match_the_cpu_engine_at_every_batch_size() {
    let Some(dev) = gpu() else { return };
    let cpu = engine(WAE, &Device::Cpu, GraphMode::Auto);
    let graph = engine(WAE, &dev, GraphMode::On);
    let eager = engine(WAE, &dev, GraphMode::Off);
    assert_eq!(graph.execution(), Some(Execution::Graph));
    assert_eq!(eager.execution().unwrap().name(), "eager");
    // 1, then a new size (a second capture), then 1 again (the first graph, replayed).
    for n in [1, 3, 1, 8] {
        let x = batch(n);
        let (want, _) = cpu.logits_timed(&x).unwrap();
        for e in [&graph, &eager] {
            let (got, stages) = e.logits_timed(&x).unwrap();
            assert_eq!(got.len(), n);
            let d = rel_diff(&got, &want);
            assert!(d < 5e-3, "batch {n}, {:?}: {d}", e.execution());
            assert!(stages.backbone.as_nanos() > 0, "GPU stage times recorded");
        }
    }
    assert_eq!(graph.execution(), Some(Execution::Graph), "no fallback");
}

#[test]
fn a_replayed_graph_reads_each_new_frame() {
    let Some(dev) = gpu() else { return };
    let graph = engine(PLAIN, &dev, GraphMode::On);
    let (a, _) = graph.logits_timed(&batch(1)).unwrap();
    let other = (batch(1) * -1.0).unwrap();
    let (b, _) = graph.logits_timed(&other).unwrap();
    let (a2, _) = graph.logits_timed(&batch(1)).unwrap();
    assert_ne!(a, b, "the second frame's logits differ from the first's");
    assert_eq!(a, a2, "the same frame again gives the same logits");
}

#[test]
fn the_shipped_samples_get_the_cpu_top1_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let mut samples: Vec<_> = std::fs::read_dir("models/fashion-wae/samples")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    samples.sort();
    let imgs: Vec<_> = samples
        .iter()
        .map(|p| wae_edge::preprocess::load_image(p).unwrap())
        .collect();
    let cpu = Classifier::load(WAE, &Device::Cpu).unwrap();
    let gpu = Classifier::load_graph(WAE, &dev, EngineKind::Auto, GraphMode::Auto).unwrap();
    let a = cpu.classify(&imgs, 1).unwrap();
    let b = gpu.classify(&imgs, 1).unwrap();
    for ((p, x), y) in samples.iter().zip(a).zip(b) {
        assert_eq!(x[0].class, y[0].class, "{}", p.display());
    }
}

#[test]
fn the_direct_conv_kernel_matches_candles_conv_in_f16() {
    let Some(dev) = gpu() else { return };
    for (c_in, c_out, h, w, stride, relu) in [
        (3, 16, 37, 53, 1, true),
        (16, 16, 20, 21, 1, true),
        (16, 6, 37, 53, 2, false),
        (32, 32, 9, 7, 1, false),
    ] {
        let x = Tensor::randn(0f32, 1., (2, c_in, h, w), &Device::Cpu).unwrap();
        let wt =
            (Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &Device::Cpu).unwrap() * 0.2).unwrap();
        let b = Tensor::randn(0f32, 1., c_out, &Device::Cpu).unwrap();
        let op = DirectConv { stride, relu };
        let d = gpu_against_cpu(&dev, (&x, &wt, &b), |x, w, b| op.apply(x, w, b).unwrap());
        assert!(d < 5e-3, "{c_in}->{c_out} {h}x{w}/{stride}: {d}");
    }
}

#[test]
fn the_gemm_conv_kernels_match_the_cpu_in_f16() {
    let Some(dev) = gpu() else { return };
    for (n, c_in, c_out, h, w, stride, relu) in [
        (1, 64, 64, 28, 28, 1, true),
        (3, 48, 33, 17, 15, 1, false),
        (2, 64, 128, 14, 14, 2, true),
    ] {
        let x = Tensor::randn(0f32, 1., (n, c_in, h, w), &Device::Cpu).unwrap();
        let wt =
            (Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &Device::Cpu).unwrap() * 0.05).unwrap();
        let b = Tensor::randn(0f32, 1., c_out, &Device::Cpu).unwrap();
        let d = gpu_against_cpu(&dev, (&x, &wt, &b), |x, w, b| {
            gemm_conv::conv(x, w, b, stride, relu).unwrap()
        });
        assert!(d < 5e-3, "{n} {c_in}->{c_out} {h}x{w}/{stride}: {d}");
    }
}
