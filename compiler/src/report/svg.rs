//! Inline SVG charts for the HTML reports: a line chart with an optional marked x, a bar
//! chart and a histogram. Text is escaped here; callers pass plain strings.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 240.0;
/// Plot area margins: left (y labels), right, top (title), bottom (x labels).
const M: (f64, f64, f64, f64) = (56.0, 16.0, 28.0, 36.0);

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A tick label: few significant digits, no exponent for everyday magnitudes.
fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Open SVG with its title and the axes' frame and four y ticks from 0 to `y_max`.
fn frame(title: &str, x_label: &str, y_label: &str, y_max: f64) -> String {
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><title>{t}</title><text x="{x}" y="18" font-size="14" font-weight="bold">{t}</text>"#,
        t = escape(title),
        x = M.0
    );
    let (x0, x1, y0, y1) = (M.0, W - M.1, H - M.3, M.2);
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="#fafafa" stroke="#999"/>"##,
        x1 - x0,
        y0 - y1
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let y = y0 - (y0 - y1) * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{x0}" x2="{x1}" y1="{y}" y2="{y}" stroke="#e4e4e4"/><text x="{}" y="{}" font-size="10" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            y + 3.0,
            label(v)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text><text x="12" y="{}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {})">{}</text>"#,
        (x0 + x1) / 2.0,
        H - 6.0,
        escape(x_label),
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        escape(y_label)
    );
    s
}

fn nice_max(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|&m| m >= v).unwrap_or(10.0 * p)
}

/// A line over `points` (x ascending), x from 0 to the last x; `mark` draws a dashed
/// vertical line at an x with a label (the throttling point).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
    mark: Option<(f64, &str)>,
) -> String {
    let y_max = nice_max(points.iter().map(|p| p.1).fold(0.0, f64::max));
    let x_max = points.last().map_or(1.0, |p| p.0).max(1.0);
    let mut s = frame(title, x_label, y_label, y_max);
    let (x0, x1, y0, y1) = (M.0, W - M.1, H - M.3, M.2);
    let px = |x: f64| x0 + (x1 - x0) * x / x_max;
    let py = |y: f64| y0 - (y0 - y1) * y / y_max;
    for i in 0..=4 {
        let x = x_max * i as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            px(x),
            y0 + 13.0,
            label(x)
        );
    }
    let pts: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
    let _ = write!(s, r##"<polyline fill="none" stroke="#1f6fb4" stroke-width="2" points="{}"/>"##, pts.join(" "));
    if let Some((x, text)) = mark {
        let _ = write!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{y1}" y2="{y0}" stroke="#c0392b" stroke-dasharray="4 3" stroke-width="1.5"/><text x="{}" y="{}" font-size="11" fill="#c0392b">{}</text>"##,
            px(x) + 4.0,
            y1 + 14.0,
            escape(text),
            x = px(x)
        );
    }
    s.push_str("</svg>");
    s
}

/// Horizontal bars, one per `(label, value)`, with the value printed in `unit`.
pub fn bar_chart(title: &str, bars: &[(String, f64)], unit: &str) -> String {
    let max = nice_max(bars.iter().map(|b| b.1).fold(0.0, f64::max));
    let row = 26.0;
    let h = M.2 + row * bars.len() as f64 + 12.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="{t}"><title>{t}</title><text x="8" y="18" font-size="14" font-weight="bold">{t}</text>"#,
        t = escape(title)
    );
    let (x0, x1) = (220.0, W - 90.0);
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = M.2 + row * i as f64;
        let short: String = if name.chars().count() > 34 {
            format!("…{}", name.chars().rev().take(33).collect::<Vec<_>>().into_iter().rev().collect::<String>())
        } else {
            name.clone()
        };
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text><rect x="{x0}" y="{}" width="{:.1}" height="{}" fill="#2e8b57"/><text x="{:.1}" y="{}" font-size="11">{} {}</text>"##,
            x0 - 6.0,
            y + 14.0,
            escape(&short),
            y + 3.0,
            (x1 - x0) * (v / max).clamp(0.0, 1.0),
            row - 8.0,
            x0 + (x1 - x0) * (v / max).clamp(0.0, 1.0) + 4.0,
            y + 14.0,
            label(*v),
            escape(unit)
        );
    }
    s.push_str("</svg>");
    s
}

/// `bins` as `(from, to, count)` with equal widths, ascending.
pub fn histogram(title: &str, x_label: &str, bins: &[(f64, f64, u64)]) -> String {
    let y_max = nice_max(bins.iter().map(|b| b.2 as f64).fold(0.0, f64::max));
    let mut s = frame(title, x_label, "steps", y_max);
    let (x0, x1, y0, y1) = (M.0, W - M.1, H - M.3, M.2);
    let (lo, hi) = (bins.first().map_or(0.0, |b| b.0), bins.last().map_or(1.0, |b| b.1));
    let span = (hi - lo).max(1e-12);
    let px = |x: f64| x0 + (x1 - x0) * (x - lo) / span;
    for &(from, to, count) in bins {
        let top = y0 - (y0 - y1) * count as f64 / y_max;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#8e44ad"/>"##,
            px(from) + 0.5,
            (px(to) - px(from) - 1.0).max(0.5),
            y0 - top
        );
    }
    for i in 0..=4 {
        let x = lo + span * i as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            px(x),
            y0 + 13.0,
            label(x)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_escape_their_text() {
        let line = line_chart(
            "tokens/s <run>",
            "s",
            "tok/s",
            &[(0.0, 10.0), (1.0, 12.0), (2.0, 6.0)],
            Some((2.0, "throttled")),
        );
        assert!(line.starts_with("<svg") && line.ends_with("</svg>"));
        assert!(line.contains("&lt;run&gt;") && !line.contains("<run>"));
        assert!(line.contains("stroke-dasharray"), "the mark is drawn");
        let bars = bar_chart("memory", &[("a".into(), 5.0), ("b & c".into(), 0.0)], "MiB");
        assert!(bars.contains("b &amp; c"));
        let hist = histogram("latency", "ms", &[(1.0, 2.0, 3), (2.0, 3.0, 0)]);
        assert_eq!(hist.matches("<rect").count(), 3, "frame and two bins");
        assert_eq!(nice_max(7.3), 10.0);
        assert_eq!(nice_max(0.0), 1.0);
    }
}
