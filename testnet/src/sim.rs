//! A swarm in virtual time: the real piece scheduler of every receiver, driven by a fluid model
//! of the links instead of sockets.
//!
//! Owns nothing but the model: each node has an upload and a download rate; every transfer in
//! flight gets `min(uploader's rate / its transfers, downloader's rate / its transfers)` per
//! step; a finished piece becomes a "have" for every other node; the origin follows the node's
//! super-seeding policy. Time is a counter, so a run is deterministic for a given seed and says how close the scheduler's choices come to the fluid
//! bound, independent of this machine's load. It does not model latency, protocol overhead or
//! CPU: the process, netns and docker backends measure those.

use std::time::{Duration, Instant};

use imiswarm_protocol::bitfield::Bitfield;
use imiswarm_protocol::scheduler::{Locality, Priority, Scheduler, SchedulerConfig};
use imiswarm_protocol::superseed::{Admission, DEFAULT_HOLD, SuperSeed};

use crate::bound::FluidBound;

/// One receiver's links.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimNode {
    pub upload: f64,
    pub download: f64,
    pub site: u32,
}

/// A distribution to simulate: one origin holding everything, receivers holding nothing.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub pieces: u32,
    pub piece_bytes: u64,
    pub origin_upload: f64,
    pub origin_site: u32,
    pub receivers: Vec<SimNode>,
    /// Virtual time per step.
    pub step: Duration,
    /// Give up after this much virtual time.
    pub max_time: Duration,
    pub seed: u64,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Virtual seconds at which each receiver held every piece (None: not by `max_time`).
    pub completion_secs: Vec<Option<f64>>,
    /// Time until the last receiver finished.
    pub seconds: f64,
    pub bound_seconds: f64,
    pub image_bytes: u64,
    pub origin_upload_bytes: u64,
    /// Bytes that crossed between sites (counted at the receiver).
    pub cross_site_bytes: u64,
    /// Bytes sent for pieces whose transfer was cancelled (endgame duplicates).
    pub wasted_bytes: u64,
}

impl SimReport {
    pub fn ratio_to_bound(&self) -> f64 {
        self.seconds / self.bound_seconds
    }
}

#[derive(Debug)]
struct Transfer {
    from: usize,
    to: usize,
    piece: u32,
    remaining: f64,
}

/// Node 0 is the origin; receivers are 1..=N.
pub fn simulate(config: &SimConfig) -> SimReport {
    let n = config.receivers.len();
    let nodes = n + 1;
    let upload = |i: usize| {
        if i == 0 {
            config.origin_upload
        } else {
            config.receivers[i - 1].upload
        }
    };
    let download = |i: usize| config.receivers[i - 1].download;
    let site = |i: usize| {
        if i == 0 {
            config.origin_site
        } else {
            config.receivers[i - 1].site
        }
    };

    let mut schedulers: Vec<Scheduler<usize>> = (1..nodes)
        .map(|me| {
            let mut s = Scheduler::new(
                config.pieces,
                SchedulerConfig::default(),
                config.seed.wrapping_add(me as u64),
            );
            s.want_all(Priority::Normal);
            for peer in (0..nodes).filter(|&p| p != me) {
                let locality = if peer == 0 {
                    Locality::Origin
                } else if site(peer) == site(me) {
                    Locality::SameSite
                } else {
                    Locality::OtherSite
                };
                s.add_peer(peer, locality);
            }
            s.peer_bitfield(0, &Bitfield::full(config.pieces));
            s
        })
        .collect();

    let start = Instant::now();
    let dt = config.step.as_secs_f64();
    let mut now = start;
    let mut transfers: Vec<Transfer> = Vec::new();
    let mut completion = vec![None; n];
    let mut uploaded = vec![0f64; nodes];
    let mut cross_site = 0f64;
    let mut wasted = 0f64;
    let steps = (config.max_time.as_secs_f64() / dt).ceil() as u64;

    let mut origin_policy = SuperSeed::new(&Bitfield::full(config.pieces), DEFAULT_HOLD);
    for step in 1..=steps {
        for (i, sched) in schedulers.iter_mut().enumerate() {
            let me = i + 1;
            for req in sched.next_requests(now) {
                for piece in req.first..req.first + req.count {
                    // The origin answers "busy" for pieces it already sent once in its first
                    // pass; the receiver fails them there and finds them at a peer.
                    if req.peer == 0 && origin_policy.admit(piece, now) == Admission::Decline {
                        sched.on_failure(0, piece, now);
                        continue;
                    }
                    transfers.push(Transfer {
                        from: req.peer,
                        to: me,
                        piece,
                        remaining: config.piece_bytes as f64,
                    });
                }
            }
        }
        let mut up_count = vec![0u32; nodes];
        let mut down_count = vec![0u32; nodes];
        for t in &transfers {
            up_count[t.from] += 1;
            down_count[t.to] += 1;
        }
        now += config.step;
        let mut finished = Vec::new();
        for (k, t) in transfers.iter_mut().enumerate() {
            let rate = (upload(t.from) / f64::from(up_count[t.from]))
                .min(download(t.to) / f64::from(down_count[t.to]));
            let sent = (rate * dt).min(t.remaining);
            t.remaining -= sent;
            uploaded[t.from] += sent;
            if site(t.from) != site(t.to) {
                cross_site += sent;
            }
            if t.remaining <= 0.0 {
                finished.push(k);
            }
        }
        // Completions, in a fixed order so runs are reproducible.
        let mut done: Vec<(usize, usize, u32)> = finished
            .iter()
            .map(|&k| (transfers[k].to, transfers[k].from, transfers[k].piece))
            .collect();
        done.sort_unstable();
        let mut cancelled: Vec<(usize, usize, u32)> = Vec::new();
        for &(to, from, piece) in &done {
            for (peer, p) in schedulers[to - 1].on_complete(from, piece, now) {
                cancelled.push((to, peer, p));
            }
            for (j, other) in schedulers.iter_mut().enumerate() {
                if j + 1 != to {
                    other.peer_have(to, piece);
                }
            }
        }
        transfers.retain(|t| {
            let finished = done.binary_search(&(t.to, t.from, t.piece)).is_ok();
            let cancel = cancelled.contains(&(t.to, t.from, t.piece));
            if cancel && !finished {
                wasted += config.piece_bytes as f64 - t.remaining;
            }
            !(finished || cancel)
        });
        let secs = step as f64 * dt;
        for (i, sched) in schedulers.iter().enumerate() {
            if completion[i].is_none() && sched.is_done() {
                completion[i] = Some(secs);
            }
        }
        if completion.iter().all(Option::is_some) {
            break;
        }
    }

    let image_bytes = u64::from(config.pieces) * config.piece_bytes;
    let bound = FluidBound {
        file_bytes: image_bytes as f64,
        seed_upload: config.origin_upload,
        downloads: config.receivers.iter().map(|r| r.download).collect(),
        uploads: config.receivers.iter().map(|r| r.upload).collect(),
    };
    SimReport {
        seconds: completion
            .iter()
            .map(|c| c.unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max),
        completion_secs: completion,
        bound_seconds: bound.seconds(),
        image_bytes,
        origin_upload_bytes: uploaded[0] as u64,
        cross_site_bytes: cross_site as u64,
        wasted_bytes: wasted as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(receivers: usize, pieces: u32) -> SimConfig {
        let rate = 12.5e6; // 100 Mbit/s
        SimConfig {
            pieces,
            piece_bytes: 64 * 1024,
            origin_upload: rate,
            origin_site: 0,
            receivers: vec![
                SimNode {
                    upload: rate,
                    download: rate,
                    site: 0
                };
                receivers
            ],
            step: Duration::from_millis(5),
            max_time: Duration::from_secs(600),
            seed: 7,
        }
    }

    #[test]
    fn every_receiver_completes_and_the_swarm_serves_most_bytes() {
        let report = simulate(&rollout(8, 512));
        assert!(
            report.completion_secs.iter().all(Option::is_some),
            "{report:?}"
        );
        // A central server would send 8 images; the swarm's origin should send barely more
        // than one.
        let origin_share = report.origin_upload_bytes as f64 / report.image_bytes as f64;
        assert!(origin_share < 1.5, "origin sent {origin_share:.2} images");
        assert!(report.seconds >= report.bound_seconds * 0.999, "{report:?}");
    }

    #[test]
    fn same_seed_same_result() {
        assert_eq!(simulate(&rollout(4, 128)), simulate(&rollout(4, 128)));
    }
}
