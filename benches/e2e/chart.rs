//! The PNG chart: drain throughput per system and shape (top), latency
//! percentiles per system at each rate on a log scale (bottom).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::outbox::BoxError;
use crate::results::{Results, Run};

const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Series colours: one per drain shape / latency percentile.
const COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

fn register_font() -> Result<(), BoxError> {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a usable TrueType font"))?;
            return Ok(());
        }
    }
    Err("no TrueType font found for the chart (scripts/install-deps bench installs fonts-dejavu-core)".into())
}

/// Draws `results` into `path`.
pub fn draw(
    results: &Results,
    systems: &[&str],
    rates: &[&str],
    path: &Path,
) -> Result<(), BoxError> {
    register_font()?;
    let root = BitMapBackend::new(path, (1800, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(520);
    let shapes = ["drain-1-per-tx", "drain-100-per-tx"];
    let drained: Vec<&str> = systems
        .iter()
        .copied()
        .filter(|s| shapes.iter().any(|w| results.find(s, w).is_some()))
        .collect();
    grouped_bars(
        &top,
        "Backlog drain: events/s (higher is better)",
        &drained,
        &shapes.map(|w| (w, w)),
        |s, w| results.find(s, w).map(|r| r.events_per_s),
        false,
    )?;
    let live: Vec<&str> = systems
        .iter()
        .copied()
        .filter(|s| *s != "pg_recvlogical" && rates.iter().any(|w| results.find(s, w).is_some()))
        .collect();
    let panels = bottom.split_evenly((1, rates.len().max(1)));
    for (panel, rate) in panels.iter().zip(rates) {
        let pick = |r: &Run, which: &str| match which {
            "p50" => r.p50_ms,
            "p99" => r.p99_ms,
            _ => r.p999_ms,
        };
        grouped_bars(
            panel,
            &format!("{rate}: commit → Kafka ms (log scale, lower is better)"),
            &live,
            &[("p50", "p50"), ("p99", "p99"), ("p99.9", "p99.9")],
            |s, which| results.find(s, rate).and_then(|r| pick(r, which)),
            true,
        )?;
    }
    root.present()?;
    Ok(())
}

/// One panel: for each system (x), one bar per series.
fn grouped_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    systems: &[&str],
    series: &[(&str, &str)],
    value: impl Fn(&str, &str) -> Option<f64>,
    log: bool,
) -> Result<(), BoxError>
where
    DB::ErrorType: 'static,
{
    let values: Vec<f64> = systems
        .iter()
        .flat_map(|s| series.iter().filter_map(|(k, _)| value(s, k)))
        .filter(|v| *v > 0.0)
        .collect();
    let max = values.iter().copied().fold(1.0, f64::max);
    let n = systems.len().max(1);
    let width = 0.8 / series.len() as f64;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 {
            systems
                .get(i as usize)
                .map(|s| s.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };
    let title_size = if log { 18 } else { 26 };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", title_size))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80);
    let x_range = -0.5f64..(n as f64 - 0.5);
    macro_rules! body {
        ($chart:ident, $floor:expr) => {{
            $chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n)
                .x_label_formatter(&label)
                .x_label_style(("sans-serif", if log { 11 } else { 16 }))
                .y_label_style(("sans-serif", 14))
                .y_label_formatter(&|v: &f64| {
                    if *v >= 1.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.1}")
                    }
                })
                .draw()?;
            for (j, (key, name)) in series.iter().enumerate() {
                let colour = COLOURS[j % COLOURS.len()];
                let bars: Vec<(f64, f64)> = systems
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| value(s, key).filter(|v| *v > 0.0).map(|v| (i as f64, v)))
                    .collect();
                let x0 = |i: f64| i - 0.4 + j as f64 * width;
                $chart
                    .draw_series(bars.iter().map(|&(i, v)| {
                        Rectangle::new(
                            [(x0(i), $floor), (x0(i) + width * 0.95, v)],
                            colour.filled(),
                        )
                    }))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled())
                    });
                $chart.draw_series(bars.iter().map(|&(i, v)| {
                    let text = if v >= 100.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.1}")
                    };
                    Text::new(
                        text,
                        (x0(i), v),
                        ("sans-serif", if log { 10 } else { 14 }).into_font(),
                    )
                }))?;
            }
            $chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
        }};
    }
    if log {
        let floor = values.iter().copied().fold(max, f64::min).min(1.0) / 2.0;
        let mut chart = builder.build_cartesian_2d(x_range, (floor..max * 4.0).log_scale())?;
        body!(chart, floor);
    } else {
        let mut chart = builder.build_cartesian_2d(x_range, 0f64..max * 1.15)?;
        body!(chart, 0.0);
    }
    Ok(())
}
