//! Training on a toy dataset: the loss goes down, the export reloads through the inference path
//! with the same accuracy, and an interrupted run resumes from its last checkpoint.
#![cfg(feature = "train")]

use candle_core::Device;
use wae_edge::config::{preset, ArchKind, ModelConfig};
use wae_edge::dataset::Dataset;
use wae_edge::eval::evaluate;
use wae_edge::train::{train, Stage, TrainOptions};
use wae_edge::Classifier;

/// Two classes: a bright top half or a bright bottom half, with noise.
fn toy(n: usize) -> Dataset {
    let mut pixels = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % 2) as u8;
        for y in 0..28 {
            for x in 0..28 {
                let bright = (y < 14) == (class == 0);
                let noise = ((i * 31 + y * 7 + x * 13) % 40) as u8;
                pixels.push(if bright { 180 + noise } else { noise });
            }
        }
        labels.push(class);
    }
    Dataset {
        pixels,
        labels,
        channels: 1,
        height: 28,
        width: 28,
        classes: vec!["top".into(), "bottom".into()],
    }
}

fn tiny(kind: ArchKind) -> ModelConfig {
    let mut c = preset("wae-fashion").unwrap();
    c.arch.kind = kind;
    c.arch.encoder = if kind == ArchKind::Wae {
        vec![4]
    } else {
        vec![]
    };
    c.arch.backbone = vec![vec![8], vec![16]];
    c.arch.head_low = vec![16];
    c.arch.head_fuse = if kind.has_branch() { vec![16] } else { vec![] };
    c.arch.decoder.width = 4;
    c.arch.decoder.convs = 0;
    c.classes = 2;
    c.labels = vec!["top".into(), "bottom".into()];
    c
}

fn options(config: ModelConfig) -> TrainOptions {
    TrainOptions {
        config,
        dataset_name: "toy".into(),
        ae_epochs: 1,
        cls_epochs: 3,
        joint_epochs: 1,
        lambda: 0.1,
        gamma: 0.001,
        batch: 16,
        lr: 3e-3,
        joint_lr_scale: 0.1,
        weight_decay: 0.0,
        seed: 1,
        val: 32,
        limit: None,
        augment: false,
        recipe: Default::default(),
        balance: false,
    }
}

#[test]
fn wae_trains_exports_reloads_and_resumes() {
    let ds = toy(192);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let opts = options(tiny(ArchKind::Wae));
    let report = train(&opts, &ds, &run, false, &Device::Cpu).unwrap();
    let stages: Vec<Stage> = report.metrics.iter().map(|m| m.stage).collect();
    assert_eq!(
        stages,
        [
            Stage::AutoEncoder,
            Stage::Classifier,
            Stage::Classifier,
            Stage::Classifier,
            Stage::Joint
        ]
    );
    let cls: Vec<f64> = report
        .metrics
        .iter()
        .filter(|m| m.stage == Stage::Classifier)
        .map(|m| m.train_loss)
        .collect();
    assert!(cls[2] < cls[0], "classifier loss falls: {cls:?}");
    assert!(
        report.metrics.last().unwrap().val_acc.unwrap() > 0.9,
        "{:?}",
        report.metrics.last()
    );
    assert!(
        !report.tensors.keys().any(|k| k.contains(".bn.")),
        "batch norm folded at export"
    );
    for f in [
        "checkpoint.safetensors",
        "state.json",
        "metrics.csv",
        "curve.svg",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        6
    );

    // Export, reload through the memory-mapped fp16 path, and evaluate.
    let model = dir.path().join("model.safetensors");
    wae_edge::weights::save(&model, &report.config, &report.tensors).unwrap();
    let clf = Classifier::load(&model, &Device::Cpu).unwrap();
    assert!(!clf.config().untrained);
    let eval = evaluate(&clf, &ds, 64, |_| ()).unwrap();
    assert!(eval.accuracy > 0.9, "{}", eval.accuracy);
    assert_eq!(eval.confusion.iter().flatten().sum::<usize>(), ds.len());

    // A second start without --resume is refused; --resume of a finished run trains nothing more.
    assert!(train(&opts, &ds, &run, false, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    let again = train(&opts, &ds, &run, true, &Device::Cpu).unwrap();
    assert_eq!(again.metrics.len(), report.metrics.len());

    // Simulate an interruption after the first classifier epoch: resume redoes only what is missing.
    let state_path = run.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["done"] = serde_json::json!([["auto_encoder", 1], ["classifier", 1]]);
    let metrics = state["metrics"].as_array().unwrap()[..2].to_vec();
    state["metrics"] = metrics.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let resumed = train(&opts, &ds, &run, true, &Device::Cpu).unwrap();
    let epochs: Vec<(Stage, usize)> = resumed.metrics.iter().map(|m| (m.stage, m.epoch)).collect();
    assert_eq!(
        epochs,
        [
            (Stage::AutoEncoder, 1),
            (Stage::Classifier, 1),
            (Stage::Classifier, 2),
            (Stage::Classifier, 3),
            (Stage::Joint, 1)
        ]
    );

    // Other options cannot resume this run.
    let mut other = opts.clone();
    other.lambda = 1.0;
    assert!(train(&other, &ds, &run, true, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("other options"));
}

#[test]
fn the_controls_train_with_the_same_code() {
    let ds = toy(96);
    for kind in [ArchKind::Plain, ArchKind::NaiveHalf, ArchKind::Haar] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options(tiny(kind));
        o.cls_epochs = 2;
        let r = train(&o, &ds, dir.path(), false, &Device::Cpu).unwrap();
        assert!(
            r.metrics.iter().all(|m| m.stage == Stage::Classifier),
            "{kind:?}"
        );
        assert_eq!(r.metrics.len(), 2);
        assert!(r.metrics[1].train_loss.is_finite());
    }
}
