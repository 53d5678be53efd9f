//! A lean HTTP/1.1 load generator for `bench/webhooks.sh`: replays pre-signed webhook
//! deliveries over keep-alive connections and reports throughput and latency, as wrk does, but
//! without a scripting runtime in the request path (so it takes less of the machine's two
//! cores from the server, and has no garbage-collector pauses inside the latencies).
//!
//!   cargo run --release --example webhook_load -- ADDR EVENTS_TSV CONNECTIONS SECONDS
//!
//! EVENTS_TSV lines are `signature<TAB>body` (bench/gen_events.py). Connection k of n sends
//! lines k, k+n, k+2n, …, so no event is sent twice while lines last; after that it resends its
//! last line (counted as duplicates). Prints one `BENCH …` line with the same fields as
//! bench/webhook_replay.lua.
//!
//!   cargo run --release --example webhook_load -- receive PORT
//!
//! The other side, for `bench/webhooks.sh APP_EVENTS=on RECEIVER=count`: an app-event
//! receiver that answers every `POST /hook` with 204 and counts the distinct `webhook-id`s
//! (`GET /_stats`: `{"accepted", "distinct"}`), on one thread. It stands for an app on another
//! machine: it verifies nothing (tests/receiver does, with the official library), so that the
//! little CPU it takes from the two shared cores is not counted against billsync.

use std::{
    io,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

struct Outcome {
    latencies_us: Vec<u32>,
    non2xx: u64,
    duplicates: u64,
}

fn request(addr: &str, line: &str) -> Option<Vec<u8>> {
    let (signature, body) = line.split_once('\t')?;
    Some(
        format!(
            "POST /api/webhooks/stripe HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Stripe-Signature: {signature}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// Reads one response; returns its status. Bodies are small and sized by Content-Length.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<u16> {
    buffer.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end])
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "response head"))?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "status line"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(addr: String, requests: Vec<Vec<u8>>, until: Instant) -> io::Result<Outcome> {
    let mut stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let mut outcome = Outcome {
        latencies_us: Vec::with_capacity(requests.len()),
        non2xx: 0,
        duplicates: 0,
    };
    let mut buffer = Vec::with_capacity(4096);
    let mut next = 0;
    while Instant::now() < until {
        let request = match requests.get(next) {
            Some(request) => request,
            None => {
                outcome.duplicates += 1;
                requests
                    .last()
                    .expect("at least one request per connection")
            }
        };
        next += 1;
        let sent = Instant::now();
        stream.write_all(request).await?;
        let status = read_response(&mut stream, &mut buffer).await?;
        let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        outcome.latencies_us.push(micros);
        if !(200..300).contains(&status) {
            outcome.non2xx += 1;
        }
    }
    Ok(outcome)
}

/// This process's CPU time so far (user + system), from /proc: the generator reports its own
/// share of the machine for the measured window only, not for loading the events.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, 100 on every architecture it runs this on.
    Some(Duration::from_millis(ticks * 10))
}

/// The counting receiver (see the module's documentation).
fn receive(port: &str) -> Result<(), Box<dyn std::error::Error>> {
    use std::{
        collections::HashSet,
        sync::{Arc, Mutex},
    };

    use axum::{
        http::{HeaderMap, StatusCode},
        routing::{get, post},
        Json, Router,
    };

    #[derive(Default)]
    struct Counts {
        accepted: u64,
        ids: HashSet<String>,
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let hook = {
        let counts = counts.clone();
        move |headers: HeaderMap, _body: axum::body::Bytes| async move {
            let mut counts = counts.lock().expect("counts");
            counts.accepted += 1;
            if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
                counts.ids.insert(id.to_owned());
            }
            StatusCode::NO_CONTENT
        }
    };
    let stats = move || async move {
        let counts = counts.lock().expect("counts");
        Json(serde_json::json!({"accepted": counts.accepted, "distinct": counts.ids.len()}))
    };
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/_stats", get(stats));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
        println!("listening {}", listener.local_addr()?.port());
        axum::serve(listener, app).await
    })?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, port] = args.as_slice() {
        if mode == "receive" {
            return receive(port);
        }
    }
    let [_, addr, events, connections, seconds] = args.as_slice() else {
        return Err("usage: webhook_load ADDR EVENTS_TSV CONNECTIONS SECONDS".into());
    };
    let connections: usize = connections.parse()?;
    let duration = Duration::from_secs_f64(seconds.parse()?);
    let text = std::fs::read_to_string(events)?;
    let mut per_connection: Vec<Vec<Vec<u8>>> = vec![Vec::new(); connections];
    for (n, line) in text.lines().enumerate() {
        let request = request(addr, line).ok_or("a line without a tab")?;
        per_connection[n % connections].push(request);
    }
    drop(text);
    if per_connection.iter().any(Vec::is_empty) {
        return Err("fewer events than connections".into());
    }
    // Two threads, as `wrk -t2`, each with its own single-threaded runtime and half of the
    // connections: no work stealing, so a response wakes its connection on the thread that
    // sent the request.
    let cpu_before = cpu_time();
    let started = Instant::now();
    let until = started + duration;
    let mut groups: Vec<Vec<Vec<Vec<u8>>>> = vec![Vec::new(), Vec::new()];
    for (n, requests) in per_connection.into_iter().enumerate() {
        groups[n % 2].push(requests);
    }
    let threads: Vec<_> = groups
        .into_iter()
        .map(|connections| {
            let addr = addr.clone();
            std::thread::spawn(move || -> io::Result<Vec<io::Result<Outcome>>> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(async move {
                    let tasks: Vec<_> = connections
                        .into_iter()
                        .map(|requests| tokio::spawn(connection(addr.clone(), requests, until)))
                        .collect();
                    let mut outcomes = Vec::new();
                    for task in tasks {
                        outcomes.push(task.await.expect("connection task"));
                    }
                    outcomes
                }))
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for thread in threads {
        outcomes.extend(thread.join().expect("load thread")?);
    }
    let elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(cpu_time())
        .map(|(before, after)| after.saturating_sub(before));
    let mut latencies = Vec::new();
    let (mut non2xx, mut duplicates, mut errors) = (0, 0, 0);
    for outcome in outcomes {
        match outcome {
            Ok(o) => {
                latencies.extend(o.latencies_us);
                non2xx += o.non2xx;
                duplicates += o.duplicates;
            }
            Err(err) => {
                eprintln!("connection failed: {err}");
                errors += 1;
            }
        }
    }
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index =
            ((latencies.len() as f64 * p / 100.0).ceil() as usize).clamp(1, latencies.len());
        f64::from(latencies[index - 1]) / 1000.0
    };
    let requests = latencies.len();
    println!(
        "BENCH non2xx={non2xx} errors_connect={errors} errors_read=0 errors_timeout=0 duplicates={duplicates}"
    );
    println!(
        "BENCH requests={requests} duration_us={} rps={:.0} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} \
         cpu_us_per_request={:.1}",
        elapsed.as_micros(),
        requests as f64 / elapsed.as_secs_f64(),
        percentile(50.0),
        percentile(99.0),
        percentile(100.0),
        cpu.map_or(f64::NAN, |c| c.as_micros() as f64 / requests.max(1) as f64),
    );
    Ok(())
}
