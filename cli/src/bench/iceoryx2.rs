//! The `versus` section of `shmlink bench`: shmlink against iceoryx2 0.10,
//! in alternating rounds on the same machine in the same run.
//!
//! iceoryx2 runs in its own program, `shmlink-bench-iceoryx2` (the crate
//! `bench/iceoryx2`, outside this workspace and built on demand), which
//! prints one JSON object per measurement. The shmlink rows are the bench's
//! own measurements ([`shmlink_sink`], [`shmlink_rtt`], ...), called here so
//! that this section measures whatever shmlink's data path is today.

use super::*;
use std::path::{Path, PathBuf};

/// The program that measures iceoryx2.
const PROGRAM: &str = "shmlink-bench-iceoryx2";
/// Overrides where the program is looked for.
const ENV: &str = "SHMLINK_BENCH_ICEORYX2";
/// Message size of the one-way rows.
const ONE_WAY: usize = 64 << 10;

/// What the section measured: every row's value in each round.
#[derive(Serialize)]
pub(super) struct Versus {
    /// `/proc/loadavg` just before the section.
    load_before: String,
    rounds: usize,
    /// The iceoryx2 program that ran, or `None` when it is not built (the
    /// iceoryx2 rows are then absent).
    baseline: Option<PathBuf>,
    rows: Vec<Row>,
    targets: Vec<Target>,
}

#[derive(Serialize)]
struct Row {
    name: &'static str,
    /// `bytes_per_sec`, `p50_us` or `p99_us`.
    metric: &'static str,
    /// One value per round.
    values: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
}

/// Where the iceoryx2 program is: `$SHMLINK_BENCH_ICEORYX2` if set, else
/// next to this program, else in the source tree this program was built in
/// (`target/release/shmlink` → `bench/iceoryx2/target/release/`).
fn locate() -> std::result::Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{ENV}={} is no file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let beside = dir.join(PROGRAM);
    if beside.is_file() {
        return Ok(beside);
    }
    let in_tree = source_tree(dir)
        .join("bench/iceoryx2/target/release")
        .join(PROGRAM);
    if in_tree.is_file() {
        return Ok(in_tree.canonicalize().unwrap_or(in_tree));
    }
    Err(format!(
        "neither {} nor {} exists",
        beside.display(),
        in_tree.display()
    ))
}

/// The source tree of a program in `<tree>/target/<profile>/`.
fn source_tree(exe_dir: &Path) -> PathBuf {
    exe_dir.join("../..")
}

/// The command that builds the iceoryx2 program.
fn build_command() -> String {
    let manifest = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(source_tree))
        .map(|t| t.join("bench/iceoryx2/Cargo.toml"))
        .filter(|m| m.is_file())
        .and_then(|m| m.canonicalize().ok())
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "bench/iceoryx2/Cargo.toml".into());
    format!("cargo build --release --manifest-path {manifest}")
}

/// Runs the iceoryx2 program with `args` and returns the JSON it printed.
fn iceoryx2(program: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    ensure!(
        out.status.success(),
        "{} {} exited with {}",
        program.display(),
        args.join(" "),
        out.status
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{} {} printed {:?}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn field(v: &serde_json::Value, key: &str) -> Result<f64> {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("no number {key:?} in {v}"))
}

/// One round's values: (row name, metric, value).
type Round = Vec<(&'static str, &'static str, f64)>;

/// The rows of the table: section heading, then (name, metric) pairs.
const ROWS: &[(&str, &[(&str, &str)])] = &[
    (
        "64 KiB one way, park / event",
        &[
            ("shmlink sink (park)", "bytes_per_sec"),
            ("iceoryx2 event, copying reader", "bytes_per_sec"),
            ("iceoryx2 event, reader in place", "bytes_per_sec"),
            ("memcpy", "bytes_per_sec"),
        ],
    ),
    (
        "64 KiB one way, spin",
        &[
            ("shmlink sink (spin)", "bytes_per_sec"),
            ("iceoryx2 spin, copying reader", "bytes_per_sec"),
            ("iceoryx2 spin, reader in place", "bytes_per_sec"),
        ],
    ),
    (
        "64 B round trip, park / event",
        &[
            ("shmlink echo (park)", "p50_us"),
            ("iceoryx2 event ping-pong", "p50_us"),
            ("raw eventfd ping-pong", "p50_us"),
        ],
    ),
    (
        "64 B round trip, spin",
        &[
            ("shmlink echo (spin)", "p50_us"),
            ("shmlink echo (spin)", "p99_us"),
            ("iceoryx2 spin ping-pong", "p50_us"),
            ("iceoryx2 spin ping-pong", "p99_us"),
        ],
    ),
    (
        "set-up",
        &[
            ("OpenSessionVia + mapping", "p50_us"),
            ("bare D-Bus call", "p50_us"),
            ("iceoryx2 open + subscriber", "p50_us"),
        ],
    ),
];

/// Measurements per round (for the progress bar).
const STEPS_PER_ROUND: u64 = 15;

/// Runs `rounds` alternating rounds: in each, shmlink's row, then iceoryx2's.
pub(super) fn versus(
    client: &Client,
    budget: &Budget,
    rounds: usize,
    bar: &ProgressBar,
) -> Result<Versus> {
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let baseline = match locate() {
        Ok(p) => Some(p),
        Err(why) => {
            let say = format!(
                "the iceoryx2 baseline is not built ({why}): the versus section runs without its \
                 rows; build it with `{}`",
                build_command()
            );
            // Said once, on stderr (so that `--json` stays JSON), and
            // again under the table.
            bar.suspend(|| eprintln!("{say}"));
            None
        }
    };
    bar.inc_length(STEPS_PER_ROUND * rounds as u64);
    let msg: Vec<u8> = (0..ONE_WAY).map(|i| (i * 31 % 251) as u8).collect();
    let secs = format!("{}", budget.stream.as_secs_f64());
    let size = ONE_WAY.to_string();
    let buffer = RING.to_string();
    let samples = budget.round_trips.to_string();
    let cap = format!("{}", budget.latency_cap.as_secs_f64());
    let setups = budget.setups.to_string();
    let mut per_round: Vec<Round> = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let mut r: Round = Vec::new();
        let step = |what: &str| bar.set_message(format!("versus, round {round}/{rounds}: {what}"));
        let iox = |what: &str, args: &[&str]| -> Result<Option<serde_json::Value>> {
            step(what);
            let v = match &baseline {
                Some(p) => Some(iceoryx2(p, args)?),
                None => None,
            };
            bar.inc(1);
            Ok(v)
        };

        // One way, each wake-up mode: shmlink's sink, then iceoryx2's two readers.
        for (wake, label, iox_wakeup, readers) in [
            (
                Wakeup::Park,
                "shmlink sink (park)",
                "event",
                [
                    ("copy", "iceoryx2 event, copying reader"),
                    ("in-place", "iceoryx2 event, reader in place"),
                ],
            ),
            (
                Wakeup::Spin(SPIN),
                "shmlink sink (spin)",
                "spin",
                [
                    ("copy", "iceoryx2 spin, copying reader"),
                    ("in-place", "iceoryx2 spin, reader in place"),
                ],
            ),
        ] {
            step(label);
            let t = shmlink_sink(client, &msg, budget.stream, wake)?;
            push(&mut r, label, "bytes_per_sec", Some(t.bytes_per_sec));
            bar.inc(1);
            for (reader, name) in readers {
                let v = iox(
                    name,
                    &[
                        "throughput",
                        "--size",
                        &size,
                        "--buffer",
                        &buffer,
                        "--seconds",
                        &secs,
                        "--wakeup",
                        iox_wakeup,
                        "--reader",
                        reader,
                    ],
                )?;
                push(
                    &mut r,
                    name,
                    "bytes_per_sec",
                    v.map(|v| field(&v, "bytes_per_sec")).transpose()?,
                );
            }
            if wake == Wakeup::Park {
                step("memcpy");
                push(
                    &mut r,
                    "memcpy",
                    "bytes_per_sec",
                    Some(memcpy(&msg, budget.stream).bytes_per_sec),
                );
                bar.inc(1);
            }
        }

        step("shmlink echo, park");
        let l = shmlink_rtt("shmlink echo (park)", client, Wakeup::Park, budget)?;
        push(&mut r, "shmlink echo (park)", "p50_us", Some(l.p50_us));
        bar.inc(1);
        let ping = PING.to_string();
        let v = iox(
            "iceoryx2 event ping-pong",
            &[
                "latency",
                "--size",
                &ping,
                "--wakeup",
                "event",
                "--samples",
                &samples,
                "--cap-secs",
                &cap,
            ],
        )?;
        push(
            &mut r,
            "iceoryx2 event ping-pong",
            "p50_us",
            v.map(|v| field(&v, "p50_us")).transpose()?,
        );
        step("raw eventfd ping-pong");
        let l = eventfd_rtt(budget)?;
        push(&mut r, "raw eventfd ping-pong", "p50_us", Some(l.p50_us));
        bar.inc(1);

        step("shmlink echo, spin");
        let l = shmlink_rtt("shmlink echo (spin)", client, Wakeup::Spin(SPIN), budget)?;
        push(&mut r, "shmlink echo (spin)", "p50_us", Some(l.p50_us));
        push(&mut r, "shmlink echo (spin)", "p99_us", Some(l.p99_us));
        bar.inc(1);
        let v = iox(
            "iceoryx2 spin ping-pong",
            &[
                "latency",
                "--size",
                &ping,
                "--wakeup",
                "spin",
                "--samples",
                &samples,
                "--cap-secs",
                &cap,
            ],
        )?;
        if let Some(v) = v {
            push(
                &mut r,
                "iceoryx2 spin ping-pong",
                "p50_us",
                Some(field(&v, "p50_us")?),
            );
            push(
                &mut r,
                "iceoryx2 spin ping-pong",
                "p99_us",
                Some(field(&v, "p99_us")?),
            );
        }

        step("OpenSessionVia + mapping, and a bare D-Bus call");
        let (open, ping) = setup_times(
            client,
            service::ECHO,
            "OpenSessionVia + mapping",
            budget.setups,
        )?;
        push(
            &mut r,
            "OpenSessionVia + mapping",
            "p50_us",
            Some(open.p50_us),
        );
        push(&mut r, "bare D-Bus call", "p50_us", Some(ping.p50_us));
        bar.inc(2);
        let v = iox("iceoryx2 open", &["open", "--samples", &setups])?;
        push(
            &mut r,
            "iceoryx2 open + subscriber",
            "p50_us",
            v.map(|v| field(&v, "p50_us")).transpose()?,
        );
        per_round.push(r);
    }

    let mut rows = Vec::new();
    for (_, section) in ROWS {
        for &(name, metric) in section.iter() {
            let values: Vec<f64> = per_round
                .iter()
                .filter_map(|r| {
                    r.iter()
                        .find(|(n, m, _)| *n == name && *m == metric)
                        .map(|(_, _, v)| *v)
                })
                .collect();
            if values.is_empty() {
                continue;
            }
            rows.push(Row {
                name,
                metric,
                median: median(&values),
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                values,
            });
        }
    }
    let targets = targets(&rows);
    Ok(Versus {
        load_before,
        rounds,
        baseline,
        rows,
        targets,
    })
}

fn push(r: &mut Round, name: &'static str, metric: &'static str, v: Option<f64>) {
    if let Some(v) = v {
        r.push((name, metric, v));
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The targets, on the medians over the rounds; those whose rows are absent
/// (the iceoryx2 ones without the baseline) are left out.
fn targets(rows: &[Row]) -> Vec<Target> {
    let m = |name: &str, metric: &str| {
        rows.iter()
            .find(|r| r.name == name && r.metric == metric)
            .map_or(f64::NAN, |r| r.median)
    };
    let mut out = Vec::new();
    let mut at_least = |what: &str, value: f64, min: f64| {
        if value.is_nan() {
            return;
        }
        out.push(Target {
            what: what.into(),
            measured: value,
            target: format!(">= {min}"),
            met: value >= min,
        })
    };
    let park = m("shmlink sink (park)", "bytes_per_sec");
    at_least(
        "64 KiB one-way park: shmlink / iceoryx2 copying",
        park / m("iceoryx2 event, copying reader", "bytes_per_sec"),
        1.2,
    );
    at_least(
        "64 KiB one-way park: shmlink / iceoryx2 in place",
        park / m("iceoryx2 event, reader in place", "bytes_per_sec"),
        1.2,
    );
    at_least(
        "64 KiB one-way park: shmlink / memcpy",
        park / m("memcpy", "bytes_per_sec"),
        0.5,
    );
    let mut at_most = |what: &str, value: f64, max: f64| {
        if value.is_nan() {
            return;
        }
        out.push(Target {
            what: what.into(),
            measured: value,
            target: format!("<= {max}"),
            met: value <= max,
        })
    };
    let rtt = m("shmlink echo (park)", "p50_us");
    at_most(
        "64 B round trip p50 park: shmlink / iceoryx2 event",
        rtt / m("iceoryx2 event ping-pong", "p50_us"),
        0.8,
    );
    at_most(
        "64 B round trip p50 park: shmlink / raw eventfd",
        rtt / m("raw eventfd ping-pong", "p50_us"),
        1.2,
    );
    at_most(
        "spin round trip p50: shmlink / iceoryx2",
        m("shmlink echo (spin)", "p50_us") / m("iceoryx2 spin ping-pong", "p50_us"),
        1.0,
    );
    at_most(
        "spin round trip p99: shmlink, in µs",
        m("shmlink echo (spin)", "p99_us"),
        3.0,
    );
    let open = m("OpenSessionVia + mapping", "p50_us");
    at_most(
        "set-up p50: OpenSession / bare D-Bus call",
        open / m("bare D-Bus call", "p50_us"),
        2.0,
    );
    at_most(
        "set-up p50: OpenSession / iceoryx2 open",
        open / m("iceoryx2 open + subscriber", "p50_us"),
        0.5,
    );
    out
}

pub(super) fn print(v: &Versus) {
    println!();
    println!(
        "versus iceoryx2 0.10: medians of {} alternating rounds (min–max); load before: {}",
        v.rounds, v.load_before
    );
    match &v.baseline {
        Some(p) => println!("iceoryx2 rows measured by {}", p.display()),
        None => println!(
            "iceoryx2 rows: none, the baseline is not built (`{}`)",
            build_command()
        ),
    }
    for (heading, section) in ROWS {
        println!("{heading}");
        for &(name, metric) in section.iter() {
            let Some(r) = v.rows.iter().find(|r| r.name == name && r.metric == metric) else {
                continue;
            };
            let (med, range) = if metric == "bytes_per_sec" {
                (
                    human_rate(r.median),
                    format!("{} – {}", human_rate(r.min), human_rate(r.max)),
                )
            } else {
                let unit = if metric == "p99_us" {
                    "µs p99"
                } else {
                    "µs p50"
                };
                (
                    format!("{:.2} {unit}", r.median),
                    format!("{:.2} – {:.2}", r.min, r.max),
                )
            };
            println!("  {name:<34}{med:>16}   ({range})");
        }
    }
    println!("versus targets:");
    print_targets(&v.targets);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &'static str, metric: &'static str, values: &[f64]) -> Row {
        Row {
            name,
            metric,
            values: values.to_vec(),
            median: median(values),
            min: 0.0,
            max: 0.0,
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn targets_without_the_baseline_are_left_out() {
        let rows = [
            row("shmlink sink (park)", "bytes_per_sec", &[6e9, 5e9, 7e9]),
            row("memcpy", "bytes_per_sec", &[10e9]),
            row("shmlink echo (spin)", "p99_us", &[2.0]),
        ];
        let t = targets(&rows);
        let names: Vec<&str> = t.iter().map(|t| t.what.as_str()).collect();
        assert_eq!(
            names,
            [
                "64 KiB one-way park: shmlink / memcpy",
                "spin round trip p99: shmlink, in µs"
            ]
        );
        assert!((t[0].measured - 0.6).abs() < 1e-9 && t[0].met);
        assert!(t[1].met);
    }

    #[test]
    fn targets_against_iceoryx2_use_the_medians() {
        let rows = [
            row("shmlink sink (park)", "bytes_per_sec", &[6e9]),
            row(
                "iceoryx2 event, copying reader",
                "bytes_per_sec",
                &[4e9, 5e9, 6e9],
            ),
        ];
        let t = targets(&rows);
        let copy = t
            .iter()
            .find(|t| t.what.contains("copying"))
            .expect("the copying target");
        assert!((copy.measured - 1.2).abs() < 1e-9 && copy.met);
    }
}
