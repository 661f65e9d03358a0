//! A thousand concurrent sessions on one daemon: all served, with the
//! daemon's thread count bounded by the cores and its memory close to the
//! sum of the rings.

use shmlink_tests::{fd_count, payload, proc_status, wait_until, Harness, DEADLINE};
use std::time::Duration;

const SESSIONS: usize = 1000;
/// Requested capacity per ring; shmem-ipc rounds the memfd to whole pages.
const CAPACITY: u64 = 4096;

/// Raises this process's soft fd limit to its hard limit: a thousand
/// sessions hold about seven thousand fds on the client side too.
fn raise_fd_limit() {
    // Raising the soft limit up to the hard one is always allowed; a failure
    // shows later as the test running out of fds, with a clear error.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}

#[test]
fn a_thousand_concurrent_sessions_on_bounded_threads_and_memory() {
    raise_fd_limit();
    let h = Harness::with_args(&[
        "--sessions-per-connection",
        "2000",
        "--sessions-per-user",
        "4000",
        "--max-capacity",
        "65536",
    ]);
    let pid = h.daemon_pid();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let rss_before = proc_status(pid, "VmRSS");
    let fds_before = fd_count(pid);

    // Four client connections, 250 sessions each, all open at the same time.
    let clients: Vec<shmlink::Client> = (0..4).map(|_| h.client()).collect();
    let mut sessions = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let service = if i % 2 == 0 { "echo" } else { "sink" };
        let s = clients[i % 4]
            .session(service)
            .capacity(CAPACITY)
            .timeout(Duration::from_secs(60))
            .open()
            .unwrap_or_else(|e| panic!("open session {i}: {e}"));
        sessions.push((i, s));
    }
    assert_eq!(h.session_count() as usize, SESSIONS);
    let ring_memfd = (sessions[0].1.send_capacity() + 64) as usize;

    // Traffic on every session from four threads: an echo round trip, or a
    // sink message larger than the ring (so it wraps and waits for room).
    let mut groups: Vec<Vec<(usize, shmlink::Session)>> = (0..4).map(|_| Vec::new()).collect();
    for (i, s) in sessions {
        groups[i % 4].push((i, s));
    }
    let workers: Vec<_> = groups
        .into_iter()
        .map(|mut group| {
            std::thread::spawn(move || {
                for (i, s) in group.iter_mut() {
                    let m = payload(*i as u64, 3 * CAPACITY as usize / 2);
                    if s.service() == "echo" {
                        s.send(&m[..1000]).expect("send");
                        assert_eq!(
                            s.recv().expect("recv").as_deref(),
                            Some(&m[..1000]),
                            "session {i}"
                        );
                    } else {
                        s.send(&m).expect("send to sink");
                        s.finish().expect("finish");
                        assert_eq!(s.recv().expect("sink end"), None, "session {i}");
                        let st = s.service_state().expect("sink state");
                        assert_eq!(
                            st.get("bytes").and_then(|v| v.0.as_u64()),
                            Some(m.len() as u64),
                            "session {i}"
                        );
                    }
                }
                group
            })
        })
        .collect();
    let groups: Vec<_> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();

    // Bounded threads: the D-Bus thread plus one worker per core (at most 8).
    let threads = proc_status(pid, "Threads");
    assert!(
        threads <= 2 * cores + 2,
        "daemon has {threads} threads for {SESSIONS} sessions on {cores} cores"
    );

    // Memory close to the sum of the rings: every ring page the traffic
    // touched is resident in the daemon (as shared memory), plus per-session
    // bookkeeping. The bound: the rings' memfds in full, plus 8 KiB of heap
    // per session (slot, decoder, outbox, D-Bus object, epoll items; about
    // 0 to 2 KiB measured), plus 4 MiB for allocator arenas and slack.
    // Measured on 2 vCPUs: +11.6 MB for 16 MB of rings (untouched ring pages
    // are not resident).
    let rss_after = proc_status(pid, "VmRSS");
    let rings_kib = (SESSIONS * 2 * ring_memfd / 1024) as u64;
    let bound_kib = rings_kib + (SESSIONS as u64) * 8 + 4 * 1024;
    let grew = rss_after.saturating_sub(rss_before);
    eprintln!(
        "{SESSIONS} sessions: daemon threads {threads}, VmRSS {rss_before} -> {rss_after} kB \
         (+{grew} kB; rings {rings_kib} kB; bound {bound_kib} kB), fds {fds_before} -> {}",
        fd_count(pid)
    );
    assert!(
        grew <= bound_kib,
        "daemon RSS grew by {grew} kB for {rings_kib} kB of rings (bound {bound_kib} kB)"
    );

    // Everything is released when the clients go.
    drop(groups);
    assert!(
        wait_until(DEADLINE * 3, || h.session_count() == 0),
        "sessions left: {}",
        h.session_count()
    );
    // Beside a little slack, the daemon keeps the next session's rings made
    // ahead: 2 memfds and 4 eventfds, their copies for the client, and both
    // ends of the hang-up pair.
    const RINGS_AHEAD_FDS: usize = 14;
    assert!(
        wait_until(DEADLINE, || fd_count(pid)
            <= fds_before + 8 + RINGS_AHEAD_FDS),
        "daemon fds {} after all sessions closed (before: {fds_before})",
        fd_count(pid)
    );
}
