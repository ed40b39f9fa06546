//! The server-side half of a run's report: spindle's per-stage put histograms
//! (`spindle_put_stage_duration_seconds` in `/metrics`), read before and after the run so the
//! summary shows where this run's puts spent their time. Endpoints without them (etcd) give no
//! breakdown.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::runtime::stages::Stage;

const METRIC: &str = "spindle_put_stage_duration_seconds";

/// One stage's histogram as scraped: cumulative counts by upper bound (seconds, `+Inf` last).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scraped {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// Every stage found, by stage name.
pub type Scrape = BTreeMap<String, Scraped>;

/// Reads the stage histograms of every endpoint and adds them up; `None` if no endpoint has them.
pub fn scrape_all(endpoints: &[String]) -> Option<Scrape> {
    let mut total: Option<Scrape> = None;
    for ep in endpoints {
        let Some(one) = fetch_metrics(ep).map(|text| parse(&text)) else {
            continue;
        };
        if one.is_empty() {
            continue;
        }
        let t = total.get_or_insert_with(Scrape::new);
        for (name, s) in one {
            let into = t.entry(name).or_default();
            if into.cumulative.is_empty() {
                into.cumulative = s.cumulative.iter().map(|&(le, _)| (le, 0)).collect();
            }
            for (a, b) in into.cumulative.iter_mut().zip(&s.cumulative) {
                a.1 += b.1;
            }
            into.count += s.count;
            into.sum += s.sum;
        }
    }
    total
}

/// `GET /metrics` over HTTP/1.1; `None` on any failure (the endpoint may not be spindle).
fn fetch_metrics(endpoint: &str) -> Option<String> {
    let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .ok()?
        .next()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The stage histograms in a Prometheus text exposition.
pub fn parse(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Some(stage) = label(series, "stage") else {
            continue;
        };
        let entry = out.entry(stage.to_string()).or_default();
        if series.starts_with("_bucket{") {
            let le = match label(series, "le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                None => continue,
            };
            if let Ok(n) = value.parse() {
                entry.cumulative.push((le, n));
            }
        } else if series.starts_with("_count{") {
            entry.count = value.parse().unwrap_or(0);
        } else if series.starts_with("_sum{") {
            entry.sum = value.parse().unwrap_or(0.0);
        }
    }
    out
}

fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
    let len = series[start..].find('"')?;
    Some(&series[start..start + len])
}

/// One stage over the run.
#[derive(Clone, Debug, PartialEq)]
pub struct StageDelta {
    pub stage: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub sum_secs: f64,
}

/// What happened between two scrapes, stages in path order (those no put passed are left out).
pub fn delta(before: &Scrape, after: &Scrape) -> Vec<StageDelta> {
    let mut out = Vec::new();
    let order = Stage::ALL.iter().map(|s| s.name().to_string());
    let unknown = after
        .keys()
        .filter(|k| !Stage::ALL.iter().any(|s| s.name() == k.as_str()))
        .cloned()
        .collect::<Vec<_>>();
    for name in order.chain(unknown) {
        let Some(a) = after.get(&name) else {
            continue;
        };
        let b = before.get(&name);
        let count = a.count.saturating_sub(b.map_or(0, |b| b.count));
        if count == 0 {
            continue;
        }
        let sum = (a.sum - b.map_or(0.0, |b| b.sum)).max(0.0);
        let cumulative: Vec<(f64, u64)> = a
            .cumulative
            .iter()
            .map(|&(le, n)| {
                let was = b
                    .and_then(|b| b.cumulative.iter().find(|(l, _)| *l == le))
                    .map_or(0, |x| x.1);
                (le, n.saturating_sub(was))
            })
            .collect();
        out.push(StageDelta {
            stage: name,
            count,
            mean_us: sum / count as f64 * 1e6,
            p50_us: quantile(&cumulative, 0.5) * 1e6,
            p99_us: quantile(&cumulative, 0.99) * 1e6,
            sum_secs: sum,
        });
    }
    out
}

/// Prometheus' `histogram_quantile`: linear within the bucket holding the quantile; a quantile
/// in the `+Inf` bucket is reported as the highest finite bound.
pub fn quantile(cumulative: &[(f64, u64)], q: f64) -> f64 {
    let Some(&(_, total)) = cumulative.last() else {
        return 0.0;
    };
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, n) in cumulative {
        if n as f64 >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let in_bucket = (n - lower.1) as f64;
            if in_bucket == 0.0 {
                return le;
            }
            return lower.0 + (le - lower.0) * (rank - lower.1 as f64) / in_bucket;
        }
        lower = (le, n);
    }
    lower.0
}

/// The table printed after a run's summary. `client_mean_us` is the mean latency the
/// generator saw, to show how much of it the server's stages account for.
pub fn summary(stages: &[StageDelta], client_mean_us: f64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let total: f64 = stages.iter().map(|d| d.sum_secs).sum();
    let _ = writeln!(
        s,
        "Server-side put stages (spindle /metrics, this run incl. warmup):"
    );
    let _ = writeln!(
        s,
        "  {:<14} {:>9} {:>10} {:>10} {:>10} {:>7}",
        "stage", "count", "mean µs", "p50 µs", "p99 µs", "share"
    );
    for d in stages {
        let _ = writeln!(
            s,
            "  {:<14} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>6.1}%",
            d.stage,
            d.count,
            d.mean_us,
            d.p50_us,
            d.p99_us,
            100.0 * d.sum_secs / total.max(1e-12)
        );
    }
    // Per put: the stages every put passes, plus the hops' share spread over all puts.
    let puts = stages.iter().map(|d| d.count).max().unwrap_or(0).max(1);
    let per_put_us = total / puts as f64 * 1e6;
    let _ = writeln!(
        s,
        "  server time per put {per_put_us:.1} µs of {client_mean_us:.1} µs mean client latency \
         (the rest: client, network, HTTP/2 framing, scheduling outside the stages)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE spindle_put_stage_duration_seconds histogram
spindle_put_stage_duration_seconds_bucket{stage=\"decode\",le=\"0.00001\"} 1
spindle_put_stage_duration_seconds_bucket{stage=\"decode\",le=\"0.0001\"} 2
spindle_put_stage_duration_seconds_bucket{stage=\"decode\",le=\"+Inf\"} 2
spindle_put_stage_duration_seconds_sum{stage=\"decode\"} 0.00005
spindle_put_stage_duration_seconds_count{stage=\"decode\"} 2
spindle_put_stage_duration_seconds_bucket{stage=\"hop_back\",le=\"0.00001\"} 0
spindle_put_stage_duration_seconds_bucket{stage=\"hop_back\",le=\"0.0001\"} 0
spindle_put_stage_duration_seconds_bucket{stage=\"hop_back\",le=\"+Inf\"} 0
spindle_put_stage_duration_seconds_sum{stage=\"hop_back\"} 0
spindle_put_stage_duration_seconds_count{stage=\"hop_back\"} 0
spindle_grpc_requests_total{method=\"/etcdserverpb.KV/Put\"} 2
";

    fn after() -> String {
        BEFORE
            .replace("0.00001\"} 1", "0.00001\"} 51")
            .replace("0.0001\"} 2", "0.0001\"} 102")
            .replace("\"+Inf\"} 2", "\"+Inf\"} 104")
            .replace(
                "sum{stage=\"decode\"} 0.00005",
                "sum{stage=\"decode\"} 0.00205",
            )
            .replace("count{stage=\"decode\"} 2", "count{stage=\"decode\"} 104")
    }

    #[test]
    fn parses_only_the_stage_histograms() {
        let s = parse(BEFORE);
        assert_eq!(s.len(), 2);
        let d = &s["decode"];
        assert_eq!(
            d.cumulative,
            vec![(0.00001, 1), (0.0001, 2), (f64::INFINITY, 2)]
        );
        assert_eq!((d.count, d.sum), (2, 0.00005));
    }

    #[test]
    fn deltas_give_this_runs_percentiles_and_skip_idle_stages() {
        let d = delta(&parse(BEFORE), &parse(&after()));
        assert_eq!(d.len(), 1, "{d:?}");
        let decode = &d[0];
        assert_eq!(decode.stage, "decode");
        assert_eq!(decode.count, 102);
        assert!((decode.mean_us - 2000.0 / 102.0).abs() < 1e-6);
        // 50 of 102 in (0, 10 µs], 50 in (10, 100 µs], 2 above: p50 is 51/50 into the second.
        assert!(
            (decode.p50_us - (10.0 + 90.0 * 1.0 / 50.0)).abs() < 1e-6,
            "{decode:?}"
        );
        // p99 falls in +Inf: the highest finite bound.
        assert!((decode.p99_us - 100.0).abs() < 1e-6);
        let text = summary(&d, 500.0);
        assert!(text.contains("decode"), "{text}");
        assert!(!text.contains("hop_back"), "{text}");
    }

    #[test]
    fn quantile_of_empty_histograms_is_zero() {
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[(1.0, 0), (f64::INFINITY, 0)], 0.99), 0.0);
    }
}
