//! `target/bench/report.png`: the report's four parts as one picture. Text is drawn
//! with DejaVu Sans read from disk (Debian's fonts-dejavu-core, installed by
//! scripts/setup.sh), so plotters needs no fontconfig.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// One bar group per label; each series gives one bar per label.
pub struct Bars {
    pub title: String,
    pub y_label: String,
    pub labels: Vec<String>,
    pub series: Vec<(String, Vec<f64>)>,
}

/// One line per series over a log10 x axis.
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

pub enum Panel {
    Bars(Bars),
    Lines(Lines),
}

fn load_font() -> Result<()> {
    let bytes =
        std::fs::read(FONT).with_context(|| format!("reading {FONT} (fonts-dejavu-core)"))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

pub fn draw(path: &Path, panels: &[Panel]) -> Result<()> {
    load_font()?;
    let rows = panels.len().div_ceil(2).max(1);
    let root = BitMapBackend::new(path, (1600, 560 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((rows, 2));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        match panel {
            Panel::Bars(b) => bars(area, b)?,
            Panel::Lines(l) => lines(area, l)?,
        }
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn bars(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, b: &Bars) -> Result<()> {
    let n = b.labels.len().max(1);
    let k = b.series.len().max(1);
    let top = b
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let labels = b.labels.clone();
    // A dozen cases side by side overlap: their labels are turned on their side.
    let turned = n > 6;
    let mut chart = ChartBuilder::on(area)
        .caption(&b.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(if turned { 130 } else { 70 })
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            // A label under the middle of each group only; turned on their side
            // (drawn below) when there are many.
            let i = x.floor() as usize;
            if !turned && (x - x.floor() - 0.5).abs() < 1e-6 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 13))
        .y_desc(&b.y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    if turned {
        // The mesh centres a label on its tick whatever its rotation; these start just
        // below the axis and read downwards.
        let style = ("sans-serif", 13)
            .into_font()
            .transform(FontTransform::Rotate90)
            .into_text_style(area)
            .pos(Pos::new(HPos::Left, VPos::Center));
        let (bx, by) = area.get_base_pixel();
        for (i, label) in labels.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            area.draw(&Text::new(
                label.clone(),
                (x - bx, y - by + 8),
                style.clone(),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
    }
    let width = 0.8 / k as f64;
    for (s, (name, values)) in b.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, *v)], color.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    if b.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

fn lines(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, l: &Lines) -> Result<()> {
    let pts = l.series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(&l.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 - 0.2)..(x1 + 0.2), 0.0..(y1 * 1.2).max(1.0))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(&l.x_label)
        .y_desc(&l.y_label)
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (s, (name, p)) in l.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(3)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(3))
            });
        chart
            .draw_series(
                p.iter()
                    .map(|&(x, y)| Circle::new((x, y), 5, color.filled())),
            )
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
