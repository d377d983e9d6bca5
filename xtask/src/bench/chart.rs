//! The report's chart, drawn with plotters into a PNG: nanoseconds per packet beside Katran's
//! figures, and requests per second of every end-to-end setup.
//!
//! Text goes through plotters' ab_glyph renderer with DejaVu Sans from Debian's
//! `fonts-dejavu-core`, so nothing needs fontconfig or freetype.

use std::path::Path;

use anyhow::{bail, Context};
use lb_tests::bench_e2e::{E2eReport, Mode, Setup};
use lb_tests::bench_kernel::{
    KernelReport, BACKEND_REPLY, ESTABLISHED_TCP, NEW_TCP_FLOW, NEW_TCP_FLOW_ONE_TUPLE,
    NOT_A_SERVICE, NOT_A_SERVICE_V6, UDP_FLOW_HIT,
};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Debian's DejaVu Sans (`fonts-dejavu-core`, installed by `scripts/install-deps.sh`).
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

const OURS: RGBColor = RGBColor(0x1f, 0x6f, 0xb4);
const OTHER: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);
const SECOND: RGBColor = RGBColor(0xf0, 0x8a, 0x24);

/// One group of two bars: a label, and each bar's value (None leaves a gap).
struct Group {
    label: &'static str,
    left: Option<f64>,
    right: Option<f64>,
}

/// Draws the chart into `path` (PNG): the kernel-level panel if there is a kernel report, the
/// end-to-end panel if there is an end-to-end one.
pub fn draw(
    path: &Path,
    kernel: Option<&KernelReport>,
    e2e: Option<&E2eReport>,
) -> anyhow::Result<()> {
    register_font()?;
    let panels = usize::from(kernel.is_some()) + usize::from(e2e.is_some());
    if panels == 0 {
        bail!("nothing to draw");
    }
    let width = 760 * panels as u32;
    let root = BitMapBackend::new(path, (width, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let areas = root.split_evenly((1, panels));
    let mut areas = areas.iter();
    if let (Some(kernel), Some(area)) = (kernel, areas.next()) {
        let groups = kernel_groups(kernel);
        let title = "Kernel: ns per packet (restoring wrapper, median)";
        let legend = [("xdp-lb", OURS), ("Katran", OTHER)];
        bars(area, title, "ns per packet", &groups, legend)?;
    }
    if let (Some(e2e), Some(area)) = (e2e, areas.next()) {
        let groups = e2e_groups(e2e);
        let title = "End to end: HTTP requests per second (median)";
        let legend = [("keep-alive", OURS), ("new connection per request", SECOND)];
        bars(area, title, "requests/s", &groups, legend)?;
    }
    root.present()
        .map_err(drawing)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn kernel_groups(report: &KernelReport) -> Vec<Group> {
    let case = |name: &str| report.cases.iter().find(|case| case.name == name);
    let mut groups = vec![Group {
        label: "floor",
        left: Some(report.floor.wrapped.median),
        right: report.floor.katran_ns,
    }];
    for (label, name) in [
        ("new flow, one 5-tuple", NEW_TCP_FLOW_ONE_TUPLE),
        ("new flow, new 5-tuples", NEW_TCP_FLOW),
        ("established", ESTABLISHED_TCP),
        ("reply", BACKEND_REPLY),
        ("UDP flow", UDP_FLOW_HIT),
        ("pass", NOT_A_SERVICE),
        ("pass, IPv6", NOT_A_SERVICE_V6),
    ] {
        if let Some(case) = case(name) {
            groups.push(Group {
                label,
                left: Some(case.wrapped.median),
                right: case.katran_ns,
            });
        }
    }
    groups
}

fn e2e_groups(report: &E2eReport) -> Vec<Group> {
    let rate = |setup, mode| super::report::median_rate(report, setup, mode);
    Setup::ALL
        .into_iter()
        .map(|setup| Group {
            label: match setup {
                Setup::XdpLb => "xdp-lb",
                Setup::HaproxyTcp => "HAProxy tcp",
                Setup::HaproxyHttp => "HAProxy http",
                Setup::NftDnat => "nft DNAT",
                Setup::Direct => "direct",
            },
            left: rate(setup, Mode::KeepAlive),
            right: rate(setup, Mode::NewConnection),
        })
        .collect()
}

/// A panel of grouped bars, two per group, with their values written above them.
fn bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    groups: &[Group],
    legend: [(&str, RGBColor); 2],
) -> anyhow::Result<()> {
    let top = groups
        .iter()
        .flat_map(|group| [group.left, group.right])
        .flatten()
        .fold(0.0, f64::max)
        * 1.15;
    let top = if top > 0.0 { top } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        // A segmented range includes its end: 0..last gives one segment per group.
        .build_cartesian_2d((0..groups.len() as i32 - 1).into_segmented(), 0.0..top)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .y_desc(y_label)
        .label_style((FONT, 14))
        .x_label_formatter(&|value| match value {
            SegmentValue::CenterOf(index) => groups
                .get(*index as usize)
                .map_or(String::new(), |group| group.label.to_string()),
            _ => String::new(),
        })
        .y_label_formatter(&|value| format!("{value:.0}"))
        .draw()
        .map_err(drawing)?;

    for (side, (name, color)) in legend.into_iter().enumerate() {
        let rectangles = groups.iter().enumerate().filter_map(|(index, group)| {
            let value = if side == 0 { group.left } else { group.right }?;
            let index = index as i32;
            let (from, to) = if side == 0 {
                (SegmentValue::Exact(index), SegmentValue::CenterOf(index))
            } else {
                (
                    SegmentValue::CenterOf(index),
                    SegmentValue::Exact(index + 1),
                )
            };
            let mut bar = Rectangle::new([(from, 0.0), (to, value)], color.filled());
            if side == 0 {
                bar.set_margin(0, 0, 10, 1);
            } else {
                bar.set_margin(0, 0, 1, 10);
            }
            Some(bar)
        });
        chart
            .draw_series(rectangles)
            .map_err(drawing)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        let labels = groups.iter().enumerate().filter_map(|(index, group)| {
            let value = if side == 0 { group.left } else { group.right }?;
            let index = index as i32;
            let anchor = if side == 0 {
                SegmentValue::Exact(index)
            } else {
                SegmentValue::CenterOf(index)
            };
            Some(Text::new(
                format_value(value),
                (anchor, value + top * 0.015),
                (FONT, 12).into_font().color(&BLACK),
            ))
        });
        chart.draw_series(labels).map_err(drawing)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(drawing)?;
    Ok(())
}

fn format_value(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else {
        format!("{value:.0}")
    }
}

/// Loads DejaVu Sans for plotters' ab_glyph text renderer, once per process.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let bytes = std::fs::read(FONT_PATH).map_err(|error| {
            format!("reading {FONT_PATH} ({error}): install Debian's fonts-dejavu-core")
        })?;
        // plotters keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT_PATH} is not a font ab_glyph can read"))
    });
    result.clone().map_err(anyhow::Error::msg)
}

fn drawing<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {error:?}")
}
