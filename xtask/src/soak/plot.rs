//! The soak plot: RSS and CPU over time (left), drops and spans (right).
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::Sample;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

pub fn draw(samples: &[Sample], path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(500);
    let tmax = samples.last().map_or(1.0, |s| s.t_secs / 60.0).max(0.1);
    series(
        &left,
        "agent RSS (MiB) and CPU (% of a core)",
        tmax,
        &[
            (
                "RSS MiB",
                BLUE,
                samples.iter().map(|s| (s.t_secs / 60.0, s.rss_mib)).collect(),
            ),
            (
                "CPU %",
                RED,
                samples.iter().map(|s| (s.t_secs / 60.0, s.cpu_pct)).collect(),
            ),
        ],
    )?;
    series(
        &right,
        "spans created and items dropped (thousands)",
        tmax,
        &[
            (
                "spans",
                GREEN,
                samples.iter().map(|s| (s.t_secs / 60.0, s.spans / 1000.0)).collect(),
            ),
            (
                "dropped",
                MAGENTA,
                samples.iter().map(|s| (s.t_secs / 60.0, s.dropped / 1000.0)).collect(),
            ),
        ],
    )?;
    root.present().map_err(err)?;
    Ok(())
}

type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

fn series(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    caption: &str,
    tmax: f64,
    lines: &[Line],
) -> Result<()> {
    let ymax = lines
        .iter()
        .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(err)?;
    chart.configure_mesh().x_desc("minutes").draw().map_err(err)?;
    for (name, color, pts) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    Ok(())
}
