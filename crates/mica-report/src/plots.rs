//! The report's figures, drawn once per chart into both SVG (inlined in the HTML) and PNG (for
//! slides and the Markdown report).
//!
//! Text is laid out with an embedded DejaVu Sans through plotters' `ab_glyph` backend, so PNGs
//! look the same on a headless server without any system fonts or fontconfig.

use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::ReportError;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn ensure_font() {
    REGISTER.call_once(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            // The bytes are a valid TTF checked into the crate; a failure here is a build error
            // in disguise, so it is ignored rather than turned into a run-time error path.
            let _ = plotters::style::register_font(family, FontStyle::Normal, FONT);
        }
    });
}

/// Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One figure in both formats.
#[derive(Debug, Clone)]
pub struct Plot {
    /// File name without extension, unique within a report (`confusion-cnn-small`).
    pub stem: String,
    pub title: String,
    pub svg: String,
    pub png: Vec<u8>,
}

/// Something that can draw itself onto any plotters backend.
pub trait Chart {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Draws `chart` as SVG and PNG.
pub fn render<C: Chart>(stem: &str, title: &str, chart: &C) -> Result<Plot, ReportError> {
    ensure_font();
    let (w, h) = chart.size();
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        chart
            .draw(&area)
            .and_then(|_| area.present().map_err(|e| e.to_string()))
            .map_err(|e| ReportError::Plot(format!("{stem}: {e}")))?;
    }
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        chart
            .draw(&area)
            .and_then(|_| area.present().map_err(|e| e.to_string()))
            .map_err(|e| ReportError::Plot(format!("{stem}: {e}")))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| ReportError::Plot(format!("{stem}: PNG encoding: {e}")))?;
    Ok(Plot {
        stem: stem.to_string(),
        title: title.to_string(),
        svg,
        png,
    })
}

use image::ImageEncoder;

fn e2s<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// A confusion matrix with counts in the cells, shaded by the row (true class) share so that
/// rare classes are as readable as common ones. "no answer" is its own column.
pub struct ConfusionChart {
    pub title: String,
    pub labels: Vec<String>,
    pub matrix: Vec<Vec<u64>>,
    pub no_answer: Vec<u64>,
}

impl Chart for ConfusionChart {
    fn size(&self) -> (u32, u32) {
        (640, 520)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        area.fill(&WHITE).map_err(e2s)?;
        let (w, h) = self.size();
        let n = self.labels.len();
        let show_na = self.no_answer.iter().any(|&c| c > 0);
        let cols = n + usize::from(show_na);
        let left = 190i32;
        let top = 60i32;
        let bottom = 150i32;
        let cell_w = ((w as i32 - left - 20) / cols.max(1) as i32).max(10);
        let cell_h = ((h as i32 - top - bottom) / n.max(1) as i32).max(10);
        let title_style = ("sans-serif", 18).into_font().color(&BLACK);
        area.draw(&Text::new(self.title.clone(), (10, 10), title_style))
            .map_err(e2s)?;
        let small = ("sans-serif", 13).into_font().color(&BLACK);
        area.draw(&Text::new("true class (rows) / predicted (columns)", (10, 34), small.clone()))
            .map_err(e2s)?;
        for (r, row) in self.matrix.iter().enumerate() {
            let row_total: u64 = row.iter().sum::<u64>() + self.no_answer.get(r).copied().unwrap_or(0);
            let mut cells: Vec<u64> = row.clone();
            if show_na {
                cells.push(self.no_answer.get(r).copied().unwrap_or(0));
            }
            for (c, &count) in cells.iter().enumerate() {
                let share = if row_total > 0 { count as f64 / row_total as f64 } else { 0.0 };
                let x0 = left + c as i32 * cell_w;
                let y0 = top + r as i32 * cell_h;
                let diagonal = c == r;
                let base = if diagonal { (0.0, 114.0, 178.0) } else { (213.0, 94.0, 0.0) };
                let mix = |b: f64| (255.0 - (255.0 - b) * share) as u8;
                let fill = RGBColor(mix(base.0), mix(base.1), mix(base.2));
                area.draw(&Rectangle::new([(x0, y0), (x0 + cell_w, y0 + cell_h)], fill.filled()))
                    .map_err(e2s)?;
                area.draw(&Rectangle::new(
                    [(x0, y0), (x0 + cell_w, y0 + cell_h)],
                    RGBColor(200, 200, 200).stroke_width(1),
                ))
                .map_err(e2s)?;
                let text_colour = if share > 0.6 { WHITE } else { BLACK };
                let style = ("sans-serif", 15)
                    .into_font()
                    .color(&text_colour)
                    .pos(text_anchor_centre());
                area.draw(&Text::new(
                    count.to_string(),
                    (x0 + cell_w / 2, y0 + cell_h / 2),
                    style,
                ))
                .map_err(e2s)?;
            }
            let label = truncate(&self.labels[r], 24);
            let style = ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Right,
                    plotters::style::text_anchor::VPos::Center,
                ));
            area.draw(&Text::new(label, (left - 6, top + r as i32 * cell_h + cell_h / 2), style))
                .map_err(e2s)?;
        }
        let mut col_labels: Vec<String> = self.labels.clone();
        if show_na {
            col_labels.push("no answer".into());
        }
        for (c, l) in col_labels.iter().enumerate() {
            let x = left + c as i32 * cell_w + cell_w / 2;
            let y = top + n as i32 * cell_h + 8;
            let style = ("sans-serif", 13)
                .into_font()
                .transform(FontTransform::Rotate270)
                .color(&BLACK)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Right,
                    plotters::style::text_anchor::VPos::Center,
                ));
            area.draw(&Text::new(truncate(l, 20), (x, y), style)).map_err(e2s)?;
        }
        Ok(())
    }
}

fn text_anchor_centre() -> plotters::style::text_anchor::Pos {
    plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Center,
        plotters::style::text_anchor::VPos::Center,
    )
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// One labelled point per classifier (accuracy against energy or money).
pub struct ScatterChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// (name, x, y); points with a non-positive x on a log axis are left out by the caller.
    pub points: Vec<(String, f64, f64)>,
    pub log_x: bool,
}

impl Chart for ScatterChart {
    fn size(&self) -> (u32, u32) {
        (720, 460)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        area.fill(&WHITE).map_err(e2s)?;
        let xs: Vec<f64> = self.points.iter().map(|p| p.1).collect();
        let ys: Vec<f64> = self.points.iter().map(|p| p.2).collect();
        let (ymin, ymax) = padded(&ys, 0.0, 100.0);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&self.title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60);
        if self.log_x {
            let (lo, hi) = log_range(&xs);
            let mut chart = builder
                .build_cartesian_2d((lo..hi).log_scale(), ymin..ymax)
                .map_err(e2s)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 14))
                .x_labels(6)
                .x_label_formatter(&|v| short_number(*v))
                .draw()
                .map_err(e2s)?;
            for (i, (name, x, y)) in self.points.iter().enumerate() {
                let c = colour(i);
                // Labels sit beside the point, staggered so near-identical points stay legible.
                let dy = -18 + 14 * (i % 3) as i32;
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((*x, *y))
                            + Circle::new((0, 0), 7, c.filled())
                            + Text::new(name.clone(), (10, dy), ("sans-serif", 13).into_font().color(&c)),
                    ))
                    .map_err(e2s)?;
            }
        } else {
            let (lo, hi) = padded(&xs, 0.0, 1.0);
            let mut chart = builder.build_cartesian_2d(lo..hi, ymin..ymax).map_err(e2s)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 14))
                .x_labels(6)
                .x_label_formatter(&|v| short_number(*v))
                .draw()
                .map_err(e2s)?;
            for (i, (name, x, y)) in self.points.iter().enumerate() {
                let c = colour(i);
                // Labels sit beside the point, staggered so near-identical points stay legible.
                let dy = -18 + 14 * (i % 3) as i32;
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((*x, *y))
                            + Circle::new((0, 0), 7, c.filled())
                            + Text::new(name.clone(), (10, dy), ("sans-serif", 13).into_font().color(&c)),
                    ))
                    .map_err(e2s)?;
            }
        }
        Ok(())
    }
}

/// Named lines on shared axes: latency ECDFs, risk-coverage curves, reliability diagrams.
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub log_x: bool,
    /// Draws y = x (perfect calibration) as a dashed grey reference.
    pub diagonal: bool,
    /// Marks every point (for sparse series such as reliability bins).
    pub markers: bool,
}

impl Chart for LineChart {
    fn size(&self) -> (u32, u32) {
        (720, 460)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        area.fill(&WHITE).map_err(e2s)?;
        let xs: Vec<f64> = self.series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).collect();
        let ys: Vec<f64> = self.series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).collect();
        let (y0, y1) = self.y_range.unwrap_or_else(|| padded(&ys, 0.0, 1.0));
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&self.title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60);
        macro_rules! body {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .label_style(("sans-serif", 12))
                    .axis_desc_style(("sans-serif", 14))
                    .draw()
                    .map_err(e2s)?;
                if self.diagonal {
                    chart
                        .draw_series(DashedLineSeries::new(
                            vec![(0.0, 0.0), (1.0, 1.0)],
                            6,
                            4,
                            RGBColor(150, 150, 150).stroke_width(1),
                        ))
                        .map_err(e2s)?;
                }
                for (i, (name, pts)) in self.series.iter().enumerate() {
                    let c = colour(i);
                    chart
                        .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                        .map_err(e2s)?
                        .label(name.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                        });
                    if self.markers {
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                            .map_err(e2s)?;
                    }
                }
                if !self.series.is_empty() {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.85))
                        .border_style(RGBColor(180, 180, 180))
                        .label_font(("sans-serif", 12))
                        .position(SeriesLabelPosition::LowerRight)
                        .draw()
                        .map_err(e2s)?;
                }
            }};
        }
        if self.log_x {
            let (lo, hi) = self.x_range.unwrap_or_else(|| log_range(&xs));
            body!(builder.build_cartesian_2d((lo..hi).log_scale(), y0..y1).map_err(e2s)?);
        } else {
            let (lo, hi) = self.x_range.unwrap_or_else(|| padded(&xs, 0.0, 1.0));
            body!(builder.build_cartesian_2d(lo..hi, y0..y1).map_err(e2s)?);
        }
        Ok(())
    }
}

/// A range around `v` with 8 % padding; the fallback when there is nothing (or one value).
fn padded(v: &[f64], fallback_lo: f64, fallback_hi: f64) -> (f64, f64) {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        return (fallback_lo, fallback_hi);
    }
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // All points equal (every local model at $0, say): a unit-wide axis around them, not
    // one a billionth wide whose ticks all read "-0.0".
    let span = if hi - lo < 1e-12 { hi.abs().max(1.0) } else { (hi - lo).max(hi.abs() * 0.1) };
    (lo - span * 0.08, hi + span * 0.08)
}

/// A log-axis range covering `v` with a factor of 1.5 margin on each side.
fn log_range(v: &[f64]) -> (f64, f64) {
    let pos: Vec<f64> = v.iter().copied().filter(|x| x.is_finite() && *x > 0.0).collect();
    if pos.is_empty() {
        return (0.1, 10.0);
    }
    let lo = pos.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = pos.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo / 1.5, (hi * 1.5).max(lo * 3.0))
}

fn short_number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_points_get_a_readable_axis() {
        let (lo, hi) = padded(&[0.0, 0.0, 0.0], 0.0, 1.0);
        assert!(lo < -0.05 && hi > 0.05, "({lo}, {hi})");
        let (lo, hi) = padded(&[2.5, 2.5], 0.0, 1.0);
        assert!(lo < 2.4 && hi > 2.6, "({lo}, {hi})");
        assert_eq!(short_number(0.0), "0");
    }

    #[test]
    fn confusion_chart_renders_counts_into_svg_and_a_decodable_png() {
        let chart = ConfusionChart {
            title: "cnn".into(),
            labels: vec!["a".into(), "b".into()],
            matrix: vec![vec![7, 1], vec![2, 5]],
            no_answer: vec![0, 3],
        };
        let plot = render("confusion-cnn", "Confusion", &chart).unwrap();
        assert!(plot.svg.starts_with("<svg"), "{}", &plot.svg[..40]);
        for n in ["7", "1", "2", "5", "3", "no answer"] {
            assert!(plot.svg.contains(&format!(">\n{n}\n</text>")), "missing {n}");
        }
        let img = image::load_from_memory(&plot.png).unwrap();
        assert_eq!((img.width(), img.height()), chart.size());
        // Text was rasterised with the embedded font: the PNG is not one flat colour.
        let rgb = img.to_rgb8();
        let dark = rgb.pixels().filter(|p| p.0.iter().all(|&c| c < 60)).count();
        assert!(dark > 50, "{dark} dark pixels");
    }

    #[test]
    fn line_and_scatter_charts_render_with_log_axes_and_single_points() {
        let line = LineChart {
            title: "latency".into(),
            x_label: "ms".into(),
            y_label: "share".into(),
            series: vec![("one".into(), vec![(5.0, 1.0)]), ("two".into(), vec![(1.0, 0.5), (300.0, 1.0)])],
            x_range: None,
            y_range: Some((0.0, 1.0)),
            log_x: true,
            diagonal: false,
            markers: true,
        };
        let p = render("latency", "Latency", &line).unwrap();
        assert!(p.svg.contains("one") && p.svg.contains("two"));
        let scatter = ScatterChart {
            title: "acc vs energy".into(),
            x_label: "Wh".into(),
            y_label: "%".into(),
            points: vec![("cnn".into(), 0.02, 91.0)],
            log_x: true,
        };
        let p = render("scatter", "Scatter", &scatter).unwrap();
        assert!(p.svg.contains("cnn"));
        assert!(!p.png.is_empty());
    }
}
