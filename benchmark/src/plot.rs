//! `--plot`: the throughput/latency trade-off of a run as an SVG chart — output tokens/s of all
//! streams against the decode speed one stream sees, one point per level.

use anyhow::bail;
use plotters::prelude::*;

use crate::report::ServeReport;

/// The chart as SVG text.
pub fn svg(report: &ServeReport) -> anyhow::Result<String> {
    let points: Vec<(f64, f64, String)> = report
        .levels
        .iter()
        .filter_map(|l| {
            let per_stream = l.output_throughput_per_stream.as_ref()?.avg;
            Some((per_stream, l.output_throughput, l.label.clone()))
        })
        .collect();
    if points.is_empty() {
        bail!("no level has a per-stream speed to plot (did every request fail?)");
    }
    // Headroom so that the labels of the outermost points stay inside the chart.
    let max = |f: fn(&(f64, f64, String)) -> f64| {
        points.iter().map(f).fold(0.0, f64::max).max(1e-9) * 1.15
    };
    let (x_max, y_max) = (max(|p| p.0), max(|p| p.1));

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let caption = format!(
            "{} at {} ({:?})",
            report.model, report.server_url, report.endpoint
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("output tokens/s per stream (avg)")
            .y_desc("output tokens/s, all streams")
            .draw()?;
        chart.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))?;
        chart.draw_series(points.iter().map(|(x, y, label)| {
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 4, BLUE.filled())
                + Text::new(label.clone(), (6, -16), ("sans-serif", 13))
        }))?;
        root.present()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::tests::report_with;

    #[test]
    fn one_labelled_point_per_level() {
        let report = report_with(&[("c=1", 40.0, 40.0), ("c=8", 240.0, 30.0)]);
        let svg = svg(&report).unwrap();
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<circle").count(), 2);
        // plotters writes each text on a line of its own.
        assert!(svg.contains(">\nc=1\n</text>") && svg.contains(">\nc=8\n</text>"));
        assert!(svg.contains("output tokens/s per stream"));
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let mut report = report_with(&[("c=1", 40.0, 40.0)]);
        report.levels[0].output_throughput_per_stream = None;
        assert!(svg(&report).is_err());
    }
}
