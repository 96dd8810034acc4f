//! Super-seeding: the origin's upload policy during a rollout.
//!
//! Goal: the origin uploads each piece about once, so its upload for a rollout stays near one
//! image size and the swarm's receivers serve the rest. Until every piece has left the origin
//! once (the first pass), the origin declines a piece it sent less than `hold` ago: a receiver
//! that asks for it gets a "busy" answer and finds it at the peer that got it. A piece sent
//! longer ago is served again (its receiver may have crashed before sharing it), and after the
//! first pass the origin serves anything, so no piece is ever stuck.
//!
//! Non-goals: it does not know peers and does no I/O or clock reads; the node asks it before
//! each upload, with `now`, and tells it when an upload was cut off before the piece arrived,
//! with the time it was admitted (which names the admission: one piece is admitted at most once
//! per `hold`).

use std::time::{Duration, Instant};

use crate::bitfield::Bitfield;
use crate::manifest::PieceIndex;

/// How long the origin declines a second copy of a piece during the first pass: long enough
/// for the first receiver to announce and share it, short enough that a lost copy costs little.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(3);

/// The origin's answer to one piece request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Serve,
    /// Already sent once during the first pass: the requester should get it from a peer.
    Decline,
}

/// Tracks which pieces have left the origin during the first pass.
#[derive(Clone, Debug)]
pub struct SuperSeed {
    sent: Bitfield,
    /// When each piece was last admitted during the first pass, and whether that admission
    /// was its first (the one that counted it as sent).
    sent_at: Vec<Option<(Instant, bool)>>,
    /// Pieces that still have to leave once (never-travelling pieces are not counted).
    first_pass_left: u32,
    hold: Duration,
}

impl SuperSeed {
    /// `travelling` marks the pieces that are sent at all (all-zero pieces never are).
    pub fn new(travelling: &Bitfield, hold: Duration) -> Self {
        let mut sent = Bitfield::new(travelling.len());
        for piece in travelling.iter_zeros() {
            sent.set(piece);
        }
        Self {
            first_pass_left: travelling.count_ones(),
            sent_at: vec![None; travelling.len() as usize],
            sent,
            hold,
        }
    }

    /// Decides one request at `now` and records an admitted piece as sent.
    pub fn admit(&mut self, piece: PieceIndex, now: Instant) -> Admission {
        if piece >= self.sent.len() {
            return Admission::Decline;
        }
        if self.first_pass_left == 0 {
            return Admission::Serve;
        }
        let slot = &mut self.sent_at[piece as usize];
        if self.sent.set(piece) {
            self.first_pass_left -= 1;
            *slot = Some((now, true));
            return Admission::Serve;
        }
        match *slot {
            Some((at, _)) if now.saturating_duration_since(at) < self.hold => Admission::Decline,
            _ => {
                *slot = Some((now, false));
                Admission::Serve
            }
        }
    }

    /// The upload admitted at `admitted_at` broke off before the receiver had the piece.
    ///
    /// Only that admission is undone. If it was the piece's first, the piece counts as unsent
    /// again. If it was a later copy (the hold had passed), the first still counts, and the
    /// next request is served at once. If the piece was admitted again since, the newer copy
    /// stands: undoing the first pass for an old copy would send the piece once more.
    pub fn on_aborted(&mut self, piece: PieceIndex, admitted_at: Instant) {
        if self.first_pass_left == 0 {
            return;
        }
        let Some(slot) = self.sent_at.get_mut(piece as usize) else {
            return;
        };
        match *slot {
            Some((at, true)) if at == admitted_at => {
                self.sent.clear(piece);
                *slot = None;
                self.first_pass_left += 1;
            }
            Some((at, false)) if at == admitted_at => *slot = None,
            _ => {}
        }
    }

    /// Whether every travelling piece has left the origin once.
    pub fn first_pass_done(&self) -> bool {
        self.first_pass_left == 0
    }

    pub fn first_pass_left(&self) -> u32 {
        self.first_pass_left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_piece_once_then_anything() {
        let t0 = Instant::now();
        let mut travelling = Bitfield::full(4);
        travelling.clear(2); // an all-zero piece
        let mut s = SuperSeed::new(&travelling, DEFAULT_HOLD);
        assert_eq!(s.first_pass_left(), 3);
        assert_eq!(s.admit(0, t0), Admission::Serve);
        assert_eq!(s.admit(0, t0), Admission::Decline, "second copy waits");
        assert_eq!(s.admit(1, t0), Admission::Serve);
        assert_eq!(s.admit(9, t0), Admission::Decline, "out of range");
        s.on_aborted(1, t0);
        assert_eq!(
            s.admit(1, t0),
            Admission::Serve,
            "an aborted upload is retried"
        );
        assert!(!s.first_pass_done());
        assert_eq!(s.admit(3, t0), Admission::Serve);
        assert!(s.first_pass_done());
        assert_eq!(s.admit(0, t0), Admission::Serve);
        s.on_aborted(0, t0);
        s.on_aborted(9, t0);
        assert!(
            s.first_pass_done(),
            "after the first pass nothing is re-counted"
        );
    }

    #[test]
    fn a_copy_lost_with_its_receiver_is_served_again_after_the_hold() {
        // Regression: a receiver killed right after it got piece 0 never shares it. If the
        // origin declined piece 0 until its first pass ended, and the pass could not end,
        // the swarm stalled.
        let t0 = Instant::now();
        let mut s = SuperSeed::new(&Bitfield::full(2), DEFAULT_HOLD);
        assert_eq!(s.admit(0, t0), Admission::Serve);
        assert_eq!(s.admit(0, t0 + DEFAULT_HOLD / 2), Admission::Decline);
        assert_eq!(s.admit(0, t0 + DEFAULT_HOLD), Admission::Serve);
        assert_eq!(
            s.admit(0, t0 + DEFAULT_HOLD),
            Admission::Decline,
            "and held again"
        );
        assert!(!s.first_pass_done());
    }

    #[test]
    fn an_aborted_upload_undoes_only_its_own_admission() {
        let t0 = Instant::now();
        let hold = DEFAULT_HOLD;
        let mut s = SuperSeed::new(&Bitfield::full(3), hold);
        assert_eq!(s.admit(0, t0), Admission::Serve);
        // Served again once the hold passed; then the first copy's upload reports it broke
        // off late (an endgame duplicate stopped by its receiver): the second copy stands.
        assert_eq!(s.admit(0, t0 + hold), Admission::Serve);
        s.on_aborted(0, t0);
        assert_eq!(s.first_pass_left(), 2, "piece 0 still counts as sent");
        assert_eq!(s.admit(0, t0 + hold), Admission::Decline, "and is held");
        // The second copy breaking off frees the next request, still without re-counting.
        s.on_aborted(0, t0 + hold);
        assert_eq!(s.first_pass_left(), 2);
        assert_eq!(s.admit(0, t0 + hold), Admission::Serve);
        // A first admission undone by its own abort counts as unsent again.
        assert_eq!(s.admit(1, t0), Admission::Serve);
        s.on_aborted(1, t0);
        assert_eq!(s.first_pass_left(), 2);
        assert_eq!(s.admit(1, t0), Admission::Serve);
        assert_eq!(s.first_pass_left(), 1);
    }
}
