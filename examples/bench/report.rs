//! `bench --report FILE`: turns the JSON lines written by scripts/bench.sh (one per daemon run)
//! into a Markdown table: per row and variant the median and spread (min-max) over the rounds,
//! and the IOPS ratio against the row's reference variant (`qsd` when present, else the last).
//!
//! One input line: `{"row": "...", "variant": "ours", "round": 1, "cpu_s": 1.5, "rss_kib": 9000,
//! "client": {<the client's own JSON line>} | null, "error": "..." (optional)}`.

use crate::stats::median_min_max;
use serde_json::Value;
use std::fmt::Write as _;

/// One daemon run as read from the results file.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub row: String,
    pub variant: String,
    pub iops: Option<f64>,
    pub mbps: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub cpu_s: Option<f64>,
    pub ios: Option<f64>,
    pub rss_kib: Option<f64>,
    /// Bytes the image occupied on disk after the run.
    pub disk_bytes: Option<f64>,
    /// 1-minute load average of the machine when the run started.
    pub loadavg: Option<f64>,
    pub failed: bool,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Parses the results file. Blank lines are skipped; a malformed line is an error naming it.
pub fn parse_runs(text: &str) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let row = v
            .get("row")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("line {}: no \"row\"", n + 1))?;
        let variant = v
            .get("variant")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("line {}: no \"variant\"", n + 1))?;
        let client = v.get("client").filter(|c| c.is_object());
        let client_errors = client.and_then(|c| num(c, "errors")).unwrap_or(0.0);
        let failed = client.is_none() || v.get("error").is_some() || client_errors > 0.0;
        let c = |k: &str| client.and_then(|c| num(c, k));
        runs.push(Run {
            row: row.to_string(),
            variant: variant.to_string(),
            iops: c("iops"),
            mbps: c("mbps"),
            p50_us: c("lat_p50_us"),
            p99_us: c("lat_p99_us"),
            ios: c("ios"),
            cpu_s: num(&v, "cpu_s"),
            rss_kib: num(&v, "rss_kib"),
            disk_bytes: num(&v, "disk_bytes"),
            loadavg: num(&v, "loadavg"),
            failed,
        });
    }
    Ok(runs)
}

/// Keys in order of first appearance.
fn ordered<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for k in it {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// "median (min-max)", or just the median when all rounds agree or there is one; "-" if none.
pub fn fmt_spread(values: &[f64]) -> String {
    match median_min_max(values) {
        None => "-".to_string(),
        Some((m, lo, hi)) if fmt_num(lo) == fmt_num(hi) => fmt_num(m),
        Some((m, lo, hi)) => format!("{} ({}-{})", fmt_num(m), fmt_num(lo), fmt_num(hi)),
    }
}

fn collect(runs: &[&Run], f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
    runs.iter()
        .filter(|r| !r.failed)
        .filter_map(|r| f(r))
        .collect()
}

/// The Markdown table for all rows, in the order they first appear.
pub fn render(runs: &[Run]) -> String {
    let mut out = String::new();
    out.push_str(
        "| row | variant | IOPS | MB/s | p50 µs | p99 µs | daemon CPU s | CPU µs/IO | \
         peak RSS MiB | image MiB on disk | IOPS vs ref | runs ok |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for row in ordered(runs.iter().map(|r| r.row.as_str())) {
        let in_row: Vec<&Run> = runs.iter().filter(|r| r.row == row).collect();
        let variants = ordered(in_row.iter().map(|r| r.variant.as_str()));
        let reference = if variants.contains(&"qsd") {
            "qsd"
        } else {
            variants.last().copied().unwrap_or("")
        };
        let median_iops = |v: &str| {
            let rs: Vec<&Run> = in_row.iter().copied().filter(|r| r.variant == v).collect();
            median_min_max(&collect(&rs, |r| r.iops)).map(|(m, _, _)| m)
        };
        let ref_iops = median_iops(reference);
        for v in &variants {
            let rs: Vec<&Run> = in_row.iter().copied().filter(|r| r.variant == *v).collect();
            let ok = rs.iter().filter(|r| !r.failed).count();
            let cpu_per_io = collect(&rs, |r| match (r.cpu_s, r.ios) {
                (Some(c), Some(n)) if n > 0.0 => Some(c * 1e6 / n),
                _ => None,
            });
            let rss = collect(&rs, |r| r.rss_kib.map(|k| k / 1024.0))
                .into_iter()
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            let ratio = match (median_iops(v), ref_iops) {
                _ if *v == reference => "1.00 (ref)".to_string(),
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "| {row} | {v} | {} | {} | {} | {} | {} | {} | {} | {} | {ratio} | {ok}/{} |",
                fmt_spread(&collect(&rs, |r| r.iops)),
                fmt_spread(&collect(&rs, |r| r.mbps)),
                fmt_spread(&collect(&rs, |r| r.p50_us)),
                fmt_spread(&collect(&rs, |r| r.p99_us)),
                fmt_spread(&collect(&rs, |r| r.cpu_s)),
                fmt_spread(&cpu_per_io),
                rss.map_or("-".to_string(), fmt_num),
                fmt_spread(&collect(&rs, |r| r.disk_bytes.map(|b| b / 1048576.0))),
                rs.len(),
            );
        }
    }
    let loads: Vec<f64> = runs.iter().filter_map(|r| r.loadavg).collect();
    if !loads.is_empty() {
        let _ = writeln!(
            out,
            "\nMachine load (1-min load average at the start of each run): {}{}",
            fmt_spread(&loads),
            if loads.iter().any(|&l| l > 1.5) {
                "; above 1.5 other work shared the CPUs, so compare only within a row"
            } else {
                ""
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(row: &str, variant: &str, iops: f64, cpu: f64) -> String {
        format!(
            r#"{{"row":"{row}","variant":"{variant}","round":1,"cpu_s":{cpu},"rss_kib":20480,"disk_bytes":3145728,
            "client":{{"iops":{iops},"mbps":1.0,"lat_p50_us":10,"lat_p99_us":20,"ios":1000,"errors":0}}}}"#
        )
        .replace('\n', "")
    }

    #[test]
    fn parses_and_renders_ratio_against_qsd() {
        let text = [
            line("r1", "ours", 200.0, 1.0),
            line("r1", "qsd", 100.0, 2.0),
            line("r1", "ours", 300.0, 1.0),
            line("r1", "qsd", 100.0, 2.0),
            line("r1", "ours", 250.0, 1.0).replace("\"round\":1,", "\"round\":3,\"loadavg\":2.5,"),
            String::new(),
            r#"{"row":"r2","variant":"ours","round":1,"client":null,"error":"daemon died"}"#
                .to_string(),
        ]
        .join("\n");
        let runs = parse_runs(&text).unwrap();
        assert_eq!(runs.len(), 6);
        assert!(runs[5].failed);
        let table = render(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        assert!(lines[6].contains("2.50; above 1.5"), "{}", lines[6]);
        assert!(
            lines[2].starts_with("| r1 | ours | 250 (200-300) |"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("| 2.50x |"), "{}", lines[2]);
        assert!(lines[2].contains("| 1000 |"), "cpu per io: {}", lines[2]);
        assert!(lines[2].ends_with("| 3/3 |"));
        assert!(lines[3].contains("| 1.00 (ref) |"));
        assert!(
            lines[3].contains("| 20.0 | 3.00 |"),
            "rss, disk MiB: {}",
            lines[3]
        );
        assert!(lines[4].starts_with("| r2 | ours | - |"), "{}", lines[4]);
        assert!(lines[4].ends_with("| 0/1 |"));
    }

    #[test]
    fn client_errors_mark_a_run_failed() {
        let l = line("r", "ours", 5.0, 1.0).replace("\"errors\":0", "\"errors\":3");
        let runs = parse_runs(&l).unwrap();
        assert!(runs[0].failed);
    }

    #[test]
    fn malformed_lines_are_reported() {
        assert!(parse_runs("{not json").unwrap_err().contains("line 1"));
        assert!(parse_runs("{\"variant\":\"x\"}")
            .unwrap_err()
            .contains("row"));
    }

    #[test]
    fn spread_formatting() {
        assert_eq!(fmt_spread(&[]), "-");
        assert_eq!(fmt_spread(&[1234.4]), "1234");
        assert_eq!(fmt_spread(&[1.0, 3.0, 2.0]), "2.00 (1.00-3.00)");
        assert_eq!(fmt_spread(&[55.0, 55.04]), "55.0");
    }
}
