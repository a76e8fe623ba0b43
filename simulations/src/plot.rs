//! SVG learning curves: the evaluated metrics against the round.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::federation::RoundRecord;

/// Draws RMSE (if any), Recall@20 and NDCG@10 against the round, one panel each.
pub fn learning_curves(path: &Path, title: &str, history: &[RoundRecord]) -> anyhow::Result<()> {
    let points = |f: &dyn Fn(&RoundRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history.iter().filter_map(|r| f(r).map(|v| (r.round as f64, v))).collect()
    };
    let rmse = points(&|r| r.metrics.and_then(|m| m.rmse));
    let recall = points(&|r| r.metrics.map(|m| m.recall_at_20));
    let ndcg = points(&|r| r.metrics.map(|m| m.ndcg_at_10));
    let mut panels: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    if !rmse.is_empty() {
        panels.push(("RMSE", rmse));
    }
    panels.push(("Recall@20", recall));
    panels.push(("NDCG@10", ndcg));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420 * panels.len() as u32, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 18))?;
        let areas = root.split_evenly((1, panels.len()));
        let x_max = history.len().max(1) as f64;
        for (area, (name, pts)) in areas.iter().zip(&panels) {
            let (lo, hi) =
                pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, y)| (a.min(y), b.max(y)));
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(area)
                .caption(*name, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))?;
            chart
                .configure_mesh()
                .x_desc("round")
                .light_line_style(WHITE)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.3}"))
                .draw()?;
            chart.draw_series(LineSeries::new(pts.iter().copied(), BLUE.stroke_width(2)))?;
        }
        root.present()?;
    }
    crate::report::write_atomic(path, svg.as_bytes())
        .with_context(|| format!("writing plot {}", path.display()))
}

/// Reads one metric of a point.
type MetricOf = fn(&crate::federation::MetricsRecord) -> Option<f64>;

/// Draws utility against ε (log scale), one panel per metric and one line per mechanism
/// (central, and distributed noise at each bit width, with a legend); the non-private run is
/// a dashed horizontal line.
pub fn frontier(path: &Path, rep: &crate::report::SweepReport) -> anyhow::Result<()> {
    let private: Vec<&crate::report::SweepPoint> =
        rep.points.iter().filter(|p| p.target_epsilon.is_some()).collect();
    let reference = rep.points.iter().find(|p| p.target_epsilon.is_none());
    let mut panels: Vec<(&str, MetricOf)> = Vec::new();
    if rep.points.iter().any(|p| p.metrics.rmse.is_some()) {
        panels.push(("RMSE", |m| m.rmse));
    }
    panels.push(("Recall@20", |m| Some(m.recall_at_20)));
    panels.push(("NDCG@10", |m| Some(m.ndcg_at_10)));
    let (e_lo, e_hi) = private
        .iter()
        .filter_map(|p| p.target_epsilon)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), e| (a.min(e), b.max(e)));
    let (e_lo, e_hi) = if e_lo.is_finite() { (e_lo / 1.5, e_hi * 1.5) } else { (0.1, 100.0) };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420 * panels.len() as u32, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = format!(
            "privacy/utility on {} (δ = {:e})",
            rep.dataset.name,
            rep.points.first().map(|p| p.config.delta).unwrap_or(0.0)
        );
        let root = root.titled(&title, ("sans-serif", 18))?;
        let areas = root.split_evenly((1, panels.len()));
        // One series per mechanism, in the order the sweep ran them.
        let mut series: Vec<(String, Vec<&crate::report::SweepPoint>)> = Vec::new();
        for p in &private {
            let label = match p.config.mechanism {
                crate::federation::MechanismKind::Central => "central".to_owned(),
                crate::federation::MechanismKind::Distributed => {
                    format!("distributed, {} bits", p.config.bits)
                }
            };
            match series.iter_mut().find(|(l, _)| *l == label) {
                Some((_, pts)) => pts.push(p),
                None => series.push((label, vec![p])),
            }
        }
        let colours = [BLUE, GREEN, MAGENTA, BLACK, CYAN];
        for (area, (name, get)) in areas.iter().zip(&panels) {
            let lines: Vec<(&str, Vec<(f64, f64)>)> = series
                .iter()
                .map(|(label, pts)| {
                    let mut xy: Vec<(f64, f64)> =
                        pts.iter().filter_map(|p| Some((p.target_epsilon?, get(&p.metrics)?))).collect();
                    xy.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (label.as_str(), xy)
                })
                .collect();
            let refv = reference.and_then(|p| get(&p.metrics));
            let ys: Vec<f64> = lines.iter().flat_map(|(_, xy)| xy.iter().map(|p| p.1)).chain(refv).collect();
            let (lo, hi) =
                ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(area)
                .caption(*name, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d((e_lo..e_hi).log_scale(), (lo - pad)..(hi + pad))?;
            chart
                .configure_mesh()
                .x_desc("ε (dashed: non-private)")
                .light_line_style(WHITE)
                .x_label_formatter(&|x| format!("{x}"))
                .y_label_formatter(&|y| format!("{y:.3}"))
                .draw()?;
            for (k, (label, xy)) in lines.iter().enumerate() {
                let colour = colours[k % colours.len()];
                chart
                    .draw_series(LineSeries::new(xy.iter().copied(), colour.stroke_width(2)))?
                    .label(*label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                    });
                chart.draw_series(xy.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
            if lines.len() > 1 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            }
            if let Some(r) = refv {
                chart.draw_series(DashedLineSeries::new(
                    vec![(e_lo, r), (e_hi, r)],
                    6,
                    4,
                    RED.stroke_width(1),
                ))?;
            }
        }
        root.present()?;
    }
    crate::report::write_atomic(path, svg.as_bytes())
        .with_context(|| format!("writing plot {}", path.display()))
}
