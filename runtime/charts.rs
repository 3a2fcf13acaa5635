//! Pictures of benchmark results: the per-stage split of one or two models' median latency, as
//! SVG (plotters), for `wae-edge bench --chart`.

use plotters::prelude::*;

use crate::bench::BenchReport;

/// The bars of one model, in [`CATEGORIES`] order: stage medians, then the whole pass.
fn values(r: &BenchReport) -> [f64; 5] {
    let stage = |k: &str| r.stages.get(k).map_or(0.0, |s| s.p50_ms);
    [
        stage("encoder"),
        stage("backbone"),
        stage("branch"),
        stage("heads"),
        r.p50_ms,
    ]
}

/// Category labels under the bars. The branch runs beside the backbone, so the stages need not
/// add up to the whole pass.
const CATEGORIES: [&str; 5] = [
    "encoder",
    "I_L backbone",
    "I_H branch (beside the backbone)",
    "heads",
    "whole pass",
];

/// Colours of the first and second model.
const COLOURS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(160, 160, 160)];

/// Grouped bars of the per-stage medians (ms) of up to two models, each labelled `name`.
pub fn stage_chart_svg(runs: &[(&str, &BenchReport)], title: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        (1..=2).contains(&runs.len()),
        "a stage chart shows one or two models"
    );
    let bars: Vec<[f64; 5]> = runs.iter().map(|(_, r)| values(r)).collect();
    let top = bars.iter().flatten().fold(0f64, |m, v| m.max(*v)).max(1e-3) * 1.15;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 20))?;
        let mut c = ChartBuilder::on(&root)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..CATEGORIES.len() as f64, 0f64..top)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(CATEGORIES.len() * 2 + 1)
            // Ticks fall on whole and half units; only the half units (bar centres) get a name.
            .x_label_formatter(&|x| {
                let i = (x - 0.5).round();
                if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                    CATEGORIES
                        .get(i as usize)
                        .copied()
                        .unwrap_or("")
                        .to_string()
                } else {
                    String::new()
                }
            })
            .y_max_light_lines(1)
            .y_desc("median latency (ms)")
            .draw()?;
        let width = 0.8 / runs.len() as f64;
        for (m, ((name, _), vals)) in runs.iter().zip(&bars).enumerate() {
            let colour = COLOURS[m];
            let x0 = |i: usize| i as f64 + 0.1 + m as f64 * width;
            c.draw_series(vals.iter().enumerate().map(|(i, v)| {
                Rectangle::new([(x0(i), 0.0), (x0(i) + width, *v)], colour.filled())
            }))?
            .label(name.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
            c.draw_series(vals.iter().enumerate().map(|(i, v)| {
                Text::new(
                    format!("{v:.3}"),
                    (x0(i), v + top * 0.01),
                    ("sans-serif", 12),
                )
            }))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}
