//! The SVG: latency by percentile (x on a "nines" scale) above throughput
//! per second.

use crate::stats::Report;
use crate::Error;
use plotters::prelude::*;
use std::path::Path;

/// Rightmost point of the percentile axis: 99.999 %.
const NINES_MAX: f64 = 5.0;

/// Percentile → number of nines: 90 % → 1, 99 % → 2, 99.9 % → 3.
fn nines(percentile: f64) -> f64 {
    let rest = 1.0 - percentile / 100.0;
    if rest <= 10f64.powf(-NINES_MAX) {
        NINES_MAX
    } else {
        -rest.log10()
    }
}

/// Axis label of a nines value: 0 → "0%", 1 → "90%", 3 → "99.9%".
fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.round() as usize).saturating_sub(2);
    format!("{p:.decimals$}%")
}

fn chart_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Chart(e.to_string())
}

pub fn write_svg(report: &Report, path: &Path) -> Result<(), Error> {
    let root = SVGBackend::new(path, (960, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let (top, bottom) = root.split_vertically(420);

    let curve: Vec<(f64, f64)> = report
        .percentiles
        .iter()
        .map(|&(p, us)| (nines(p), us))
        .collect();
    let y_max = curve.iter().map(|&(_, us)| us).fold(1.0, f64::max) * 1.1;
    let o = &report.options;
    let title = format!(
        "Latency by percentile — {:?}, {} conns, pipeline {}, {:.0} ops/s",
        o.protocol, o.connections, o.pipeline, report.ops_per_sec
    );
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..NINES_MAX, 0f64..y_max)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| nines_label(*x))
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .draw()
        .map_err(chart_error)?;
    chart
        .draw_series(LineSeries::new(curve, BLUE.stroke_width(2)))
        .map_err(chart_error)?;

    let series: Vec<(f64, f64)> = report
        .throughput
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as f64 + 1.0, n as f64))
        .collect();
    let x_max = (series.len() as f64).max(1.0);
    let ops_max = series.iter().map(|&(_, n)| n).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("Throughput per second", ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..ops_max)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc("second of the run")
        .x_labels((series.len() + 1).min(11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("ops/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(chart_error)?;
    chart
        .draw_series(LineSeries::new(series.iter().copied(), RED.stroke_width(2)))
        .map_err(chart_error)?;
    chart
        .draw_series(series.iter().map(|&p| Circle::new(p, 3, RED.filled())))
        .map_err(chart_error)?;
    root.present().map_err(chart_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_scale() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-6);
        assert_eq!(nines(100.0), NINES_MAX);
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(5.0), "99.999%");
    }
}
