//! What /flows serves: the last final records, the newest interim record of each open
//! connection, and, for clients that follow (`/flows?follow=1`, `observer observe -f`), every
//! record as it is made, through a bounded queue per client: a client that falls behind is
//! dropped and counted, never waited for. Records reach followers a batch at a time (what one
//! poll finalised), so a client that keeps up is never dropped for a burst larger than its
//! queue; the bound is checked after each batch.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

/// Open connections kept at most; beyond it a new one waits for its final record to be served.
const OPEN_MAX: usize = 10_000;
/// Records queued for one following client by default (`--flows-follow-queue`); one that lets
/// this many pile up is dropped.
pub const FOLLOW_QUEUE: usize = 4096;
/// Following clients at most; more are refused (503) rather than letting memory grow.
pub const FOLLOWERS_MAX: usize = 32;

/// A following client's end of the stream: the records already made, then the live ones.
pub struct Follow {
    pub snapshot: Vec<Bytes>,
    pub live: Live,
}

/// Batches of JSON lines for one follower, and how many records wait in them.
pub struct Live {
    rx: mpsc::UnboundedReceiver<(Bytes, usize)>,
    queued: Arc<AtomicUsize>,
}

impl Live {
    /// The next batch (JSON lines), None once the follower was dropped.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let (b, n) = self.rx.recv().await?;
        self.queued.fetch_sub(n, Ordering::Relaxed);
        Some(b)
    }
}

struct Follower {
    tx: mpsc::UnboundedSender<(Bytes, usize)>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<Notify>,
}

/// Which of the kept records a request wants first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Select {
    /// The last N final records (and no open ones when 0); all kept if None.
    pub last: Option<usize>,
    /// Only records written after this time (RFC 3339 as records have it: a follower picking
    /// up where it was cut off).
    pub since: Option<String>,
}

/// A record as kept: when it was written, and its JSON line.
type Line = (String, Bytes);

#[derive(Default)]
struct State {
    finals: VecDeque<Line>,
    /// Connection -> its newest interim record.
    open: HashMap<String, Line>,
    followers: Vec<Follower>,
}

pub struct RecentFlows {
    state: Mutex<State>,
    cap: usize,
    follow_queue: usize,
    /// Clients dropped for falling behind.
    on_drop: Box<dyn Fn() + Send + Sync>,
}

impl RecentFlows {
    /// Keeps `cap` final records and up to `follow_queue` for each follower; `on_drop` is called
    /// for each following client dropped for falling behind.
    pub fn new(
        cap: usize,
        follow_queue: usize,
        on_drop: impl Fn() + Send + Sync + 'static,
    ) -> RecentFlows {
        RecentFlows {
            state: Default::default(),
            cap,
            follow_queue: follow_queue.max(1),
            on_drop: Box::new(on_drop),
        }
    }

    /// Keep a batch of records, each (connection, time, JSON line without its newline, final),
    /// and hand it to the followers: a final record ends its connection's open entry.
    pub fn push(&self, batch: impl IntoIterator<Item = (String, String, String, bool)>) {
        // Made before the lock: /flows readers wait for it.
        let mut chunk = Vec::new();
        let lines: Vec<(String, Line, bool)> = batch
            .into_iter()
            .map(|(conn, time, json_line, is_final)| {
                let mut line = json_line.into_bytes();
                line.push(b'\n');
                chunk.extend_from_slice(&line);
                (conn, (time, Bytes::from(line)), is_final)
            })
            .collect();
        let n = lines.len();
        let mut st = self.state.lock().expect("not poisoned");
        for (conn, line, is_final) in lines {
            if is_final {
                st.open.remove(&conn);
                if st.finals.len() == self.cap {
                    st.finals.pop_front();
                }
                st.finals.push_back(line);
            } else if st.open.len() < OPEN_MAX || st.open.contains_key(&conn) {
                st.open.insert(conn, line);
            }
        }
        if n == 0 || st.followers.is_empty() {
            return;
        }
        let chunk = Bytes::from(chunk);
        st.followers.retain(|f| {
            // A follower is held to its queue before a batch: one that keeps up takes any burst.
            if f.queued.fetch_add(n, Ordering::Relaxed) >= self.follow_queue {
                f.dropped.notify_one();
                (self.on_drop)();
                return false;
            }
            f.tx.send((chunk.clone(), n)).is_ok()
        });
    }

    /// What `sel` selects of the final records, and the open connections' latest.
    fn snapshot(st: &State, sel: &Select) -> Vec<Bytes> {
        let skip = sel.last.map_or(0, |n| st.finals.len().saturating_sub(n));
        let open = if sel.last == Some(0) {
            0
        } else {
            st.open.len()
        };
        // RFC 3339 with nanoseconds, UTC, fixed width: ordered as text.
        let after = |(t, _): &&Line| sel.since.as_ref().is_none_or(|s| t > s);
        st.finals
            .iter()
            .skip(skip)
            .chain(st.open.values().take(open))
            .filter(after)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// What `sel` selects, as one body.
    pub fn body(&self, sel: &Select) -> Bytes {
        let st = self.state.lock().expect("not poisoned");
        Bytes::from(Self::snapshot(&st, sel).concat())
    }

    /// A new follower: the snapshot and the live queue are taken under one lock, so no record
    /// is missed or sent twice between them. `dropped` is notified if it falls behind (its
    /// connection is then closed, even if the client stopped reading). None when
    /// [`FOLLOWERS_MAX`] already follow.
    pub fn follow(&self, sel: &Select, dropped: Arc<Notify>) -> Option<Follow> {
        let mut st = self.state.lock().expect("not poisoned");
        st.followers.retain(|f| !f.tx.is_closed());
        if st.followers.len() >= FOLLOWERS_MAX {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        st.followers.push(Follower {
            tx,
            queued: queued.clone(),
            dropped,
        });
        Some(Follow {
            snapshot: Self::snapshot(&st, sel),
            live: Live { rx, queued },
        })
    }

    /// Clients following now.
    pub fn followers(&self) -> usize {
        let st = self.state.lock().expect("not poisoned");
        st.followers.iter().filter(|f| !f.tx.is_closed()).count()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_follower_gets_the_snapshot_then_every_new_record_once() {
        let r = RecentFlows::new(3, FOLLOW_QUEUE, || {});
        for i in 0..5 {
            r.push([(format!("c{i}"), format!("t{i}"), format!("final {i}"), true)]);
        }
        r.push([("o".into(), "t5".into(), "open 1".into(), false)]);
        let last = |n| Select {
            last: Some(n),
            since: None,
        };
        let mut f = r.follow(&last(2), Default::default()).unwrap();
        let snap: Vec<_> = f.snapshot.iter().map(|b| b.as_ref()).collect();
        assert_eq!(snap, [&b"final 3\n"[..], b"final 4\n", b"open 1\n"]);
        r.push([("o".into(), "t6".into(), "final o".into(), true)]);
        assert_eq!(f.live.rx.try_recv().unwrap().0.as_ref(), b"final o\n");
        assert!(f.live.rx.try_recv().is_err(), "nothing twice");
        assert_eq!(
            String::from_utf8(r.body(&Select::default()).to_vec()).unwrap(),
            "final 3\nfinal 4\nfinal o\n",
            "the open entry ended with its final record"
        );
        let none = r.follow(&last(0), Default::default()).unwrap();
        assert!(none.snapshot.is_empty(), "last=0: only what comes next");
        let since = Select {
            last: None,
            since: Some("t4".into()),
        };
        assert_eq!(
            String::from_utf8(r.body(&since).to_vec()).unwrap(),
            "final o\n",
            "since: only what was written after"
        );
    }

    #[test]
    fn a_follower_that_falls_behind_is_dropped_and_counted_and_the_others_are_not() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let counted = dropped.clone();
        let r = RecentFlows::new(10, FOLLOW_QUEUE, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let slow = Arc::new(Notify::new());
        let all = Select::default();
        let _slow = r.follow(&all, slow.clone()).unwrap();
        let mut fast = r.follow(&all, Default::default()).unwrap();
        // One batch larger than the queue: a follower that keeps up is not dropped for it.
        r.push((0..FOLLOW_QUEUE + 10).map(|i| (format!("c{i}"), "t".into(), format!("{i}"), true)));
        let recv = |l: &mut Live| futures_util::FutureExt::now_or_never(l.recv()).flatten();
        assert!(recv(&mut fast.live).is_some());
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
        // The next batch finds the fast one's queue empty, the slow one's still full.
        r.push([("x".into(), "t".into(), "x".into(), true)]);
        r.push([("y".into(), "t".into(), "y".into(), true)]);
        assert!(recv(&mut fast.live).is_some() && recv(&mut fast.live).is_some());
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        assert_eq!(r.followers(), 1, "the slow one is gone");
        // Its connection is told to close: the notification waits for it.
        let told = slow.notified();
        futures_util::pin_mut!(told);
        assert!(futures_util::FutureExt::now_or_never(told).is_some());
    }

    #[test]
    fn followers_are_bounded() {
        let r = RecentFlows::new(10, FOLLOW_QUEUE, || {});
        let follow = || r.follow(&Select::default(), Default::default());
        let held: Vec<_> = (0..FOLLOWERS_MAX).map(|_| follow().unwrap()).collect();
        assert!(follow().is_none());
        drop(held);
        assert!(follow().is_some(), "closed ones make room");
    }
}
