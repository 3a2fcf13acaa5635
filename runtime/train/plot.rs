//! Training-curve picture: loss and validation accuracy per epoch, as SVG (plotters).

use plotters::prelude::*;

use super::{EpochMetrics, Stage};

fn stage_colour(s: Stage) -> RGBColor {
    match s {
        Stage::AutoEncoder => RGBColor(120, 120, 120),
        Stage::Classifier => RGBColor(31, 119, 180),
        Stage::Joint => RGBColor(214, 39, 40),
    }
}

/// Two panels over the run's epochs: training loss (log scale) and validation accuracy.
pub fn curve_svg(metrics: &[EpochMetrics], title: &str) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 20))?;
        let (left, right) = root.split_horizontally(480);
        let n = metrics.len().max(1) as f64;
        let losses: Vec<(f64, f64, Stage)> = metrics
            .iter()
            .enumerate()
            .map(|(i, m)| (i as f64 + 1.0, m.train_loss.max(1e-6), m.stage))
            .collect();
        let (lo, hi) = losses
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (lo, hi) = if lo < hi {
            (lo * 0.9, hi * 1.1)
        } else {
            (1e-3, 10.0)
        };
        let mut c = ChartBuilder::on(&left)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .caption("training loss", ("sans-serif", 16))
            .build_cartesian_2d(0.5..n + 0.5, (lo..hi).log_scale())?;
        c.configure_mesh().x_desc("epoch").draw()?;
        for stage in [Stage::AutoEncoder, Stage::Classifier, Stage::Joint] {
            let pts: Vec<(f64, f64)> = losses
                .iter()
                .filter(|p| p.2 == stage)
                .map(|p| (p.0, p.1))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let col = stage_colour(stage);
            c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
                .label(format!("{stage:?}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], col.stroke_width(2))
                });
            c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, col.filled())))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        let accs: Vec<(f64, f64)> = metrics
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i as f64 + 1.0, m.val_acc?)))
            .collect();
        let amin = accs.iter().map(|p| p.1).fold(1.0, f64::min);
        let mut c = ChartBuilder::on(&right)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .caption("validation accuracy", ("sans-serif", 16))
            .build_cartesian_2d(0.5..n + 0.5, (amin - 0.01).max(0.0)..1.0)?;
        c.configure_mesh().x_desc("epoch").draw()?;
        c.draw_series(LineSeries::new(accs.clone(), BLUE.stroke_width(2)))?;
        c.draw_series(accs.into_iter().map(|p| Circle::new(p, 3, BLUE.filled())))?;
        root.present()?;
    }
    Ok(svg)
}
