//! The wake-up latency plot: one cumulative distribution per backend and
//! broker mode, on a log-scale time axis, as a self-contained SVG.
//!
//! Written by hand rather than with a plotting crate: one chart type, a few
//! dozen lines, and no fonts or native libraries to build.

use std::fmt::Write;
use std::time::Duration;

use crate::stats::Samples;

/// One curve.
pub struct Curve<'a> {
    pub label: String,
    pub color: &'static str,
    /// Dashed: the shared backend, so both backends of a mode share a colour.
    pub dashed: bool,
    pub samples: &'a Samples,
}

const WIDTH: f64 = 1_080.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 70.0;
/// Room for the legend, right of the plot, where it hides no curve.
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// The colour of a broker mode's curves.
pub fn color(index: usize) -> &'static str {
    const PALETTE: [&str; 6] = [
        "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
    ];
    PALETTE[index % PALETTE.len()]
}

/// Renders the CDFs of `curves` under `title`.
pub fn cdf_svg(title: &str, curves: &[Curve<'_>]) -> String {
    let micros = |d: Duration| (d.as_secs_f64() * 1e6).max(1.0);
    let all = curves
        .iter()
        .flat_map(|c| c.samples.sorted().iter().copied());
    let (lo, hi) = all.fold((f64::MAX, 1.0f64), |(lo, hi), d| {
        (lo.min(micros(d)), hi.max(micros(d)))
    });
    let lo_decade = lo.min(hi).log10().floor();
    let hi_decade = hi.log10().ceil().max(lo_decade + 1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |us: f64| LEFT + (us.log10() - lo_decade) / (hi_decade - lo_decade) * plot_w;
    let y = |fraction: f64| TOP + (1.0 - fraction) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );

    // Decades with labels, and the 2..9 ticks between them.
    let mut decade = lo_decade;
    while decade <= hi_decade {
        let px = x(10f64.powf(decade));
        let _ = writeln!(
            svg,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#bbb\"/>",
            TOP + plot_h
        );
        let label = decade_label(decade);
        let _ = writeln!(
            svg,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + plot_h + 18.0
        );
        if decade < hi_decade {
            for step in 2..10 {
                let px = x(f64::from(step) * 10f64.powf(decade));
                let _ = writeln!(
                    svg,
                    "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
                    TOP + plot_h
                );
            }
        }
        decade += 1.0;
    }
    for tenth in 0..=10 {
        let fraction = f64::from(tenth) / 10.0;
        let py = y(fraction);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/>",
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{fraction:.1}</text>"#,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">wake-up latency: call-response sent → status=ACK at the PBX (log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 18.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">fraction of calls woken</text>"#,
        TOP + plot_h / 2.0
    );

    for curve in curves {
        let sorted = curve.samples.sorted();
        let n = sorted.len() as f64;
        let mut points = String::new();
        let mut last: Option<(f64, f64)> = None;
        for (i, d) in sorted.iter().enumerate() {
            // A step: the fraction rises at each sample. Points closer than
            // half a pixel to the last one add nothing to the picture.
            let px = x(micros(*d));
            for fraction in [i as f64 / n, (i + 1) as f64 / n] {
                let py = y(fraction);
                let apart =
                    last.is_none_or(|(lx, ly)| (px - lx).abs() >= 0.5 || (py - ly).abs() >= 0.5);
                if apart {
                    let _ = write!(points, "{px:.1},{py:.1} ");
                    last = Some((px, py));
                }
            }
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{} points="{}"/>"#,
            curve.color,
            if curve.dashed {
                r#" stroke-dasharray="6 3""#
            } else {
                ""
            },
            points.trim_end()
        );
    }

    let legend_x = LEFT + plot_w + 15.0;
    let legend_y = TOP + 4.0;
    let _ = writeln!(
        svg,
        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"225\" height=\"{:.1}\" fill=\"white\" stroke=\"#999\"/>",
        legend_x,
        legend_y - 4.0,
        18.0 * curves.len() as f64 + 6.0
    );
    for (i, curve) in curves.iter().enumerate() {
        let ly = legend_y + 18.0 * i as f64 + 9.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{}/>"#,
            legend_x + 8.0,
            legend_x + 38.0,
            curve.color,
            if curve.dashed {
                r#" stroke-dasharray="6 3""#
            } else {
                ""
            }
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 46.0,
            ly + 4.0,
            escape(&curve.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// `10^decade` microseconds in the unit that reads best: 10 µs, 1 ms, 1 s.
fn decade_label(decade: f64) -> String {
    let micros = 10f64.powf(decade);
    if micros < 1e3 {
        format!("{micros:.0} µs")
    } else if micros < 1e6 {
        format!("{:.0} ms", micros / 1e3)
    } else {
        format!("{:.0} s", micros / 1e6)
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
