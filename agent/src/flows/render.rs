//! The flows as an aligned table or as JSON.

use std::fmt::Write as _;

use super::stats::FlowRow;

const HEADERS: [&str; 13] = [
    "ROLE",
    "PROCESS",
    "SERVER",
    "OPENED/S",
    "REQ/CONN",
    "<=1 REQ",
    "IDLE P50",
    "IDLE P90",
    "CLOSES",
    "RACES",
    "TIME_WAIT",
    "PORTS",
    "TLS",
];

/// `seconds`: the interval rates are over (None: totals since the agent started).
pub fn table(rows: &[FlowRow], seconds: Option<f64>) -> String {
    let mut headers = HEADERS.map(str::to_owned);
    if seconds.is_none() {
        headers[3] = "OPENED".into();
    }
    let cells: Vec<[String; 13]> = rows.iter().map(cells).collect();
    let mut widths = headers.each_ref().map(|h| h.len());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = match seconds {
        Some(seconds) => format!("{} flows, rates over the last {seconds:.1} s\n", rows.len()),
        None => format!("{} flows, totals since the agent started\n", rows.len()),
    };
    for line in std::iter::once(&headers).chain(&cells) {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out.trim_end().to_owned()
}

fn cells(row: &FlowRow) -> [String; 13] {
    let number = |value: Option<f64>, digits: usize| {
        value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
    };
    let closes: Vec<String> = row
        .closes
        .iter()
        .map(|(side, reasons)| {
            let reasons: Vec<String> =
                reasons.iter().map(|(reason, count)| format!("{reason}={count}")).collect();
            format!("{side}: {}", reasons.join(" "))
        })
        .collect();
    [
        row.flow.role.clone(),
        row.flow.process.clone(),
        row.flow.server.clone(),
        row.opened_per_second.map_or_else(|| format!("{}", row.opened), |r| format!("{r:.2}")),
        number(row.requests_per_connection, 2),
        row.one_request_share.map_or_else(|| "-".into(), |share| format!("{:.0}%", share * 100.0)),
        duration(row.idle_p50_seconds),
        duration(row.idle_p90_seconds),
        if closes.is_empty() { "-".into() } else { closes.join(", ") },
        format!("{}", row.races),
        format!("{}", row.time_wait),
        ports(row),
        if row.decryption.is_empty() { "-".into() } else { row.decryption.join(",") },
    ]
}

/// `20 (71%)`: the ports a client flow holds, and the largest share of a namespace's range.
fn ports(row: &FlowRow) -> String {
    match (row.ports_in_use, row.port_range_share) {
        (None, _) => "-".into(),
        (Some(ports), None) => format!("{ports}"),
        (Some(ports), Some(share)) => format!("{ports} ({:.0}%)", share * 100.0),
    }
}

fn duration(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
    }
}

pub fn json(rows: &[FlowRow], seconds: Option<f64>) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&serde_json::json!({
        "interval_seconds": seconds,
        "flows": rows,
    }))?)
}
