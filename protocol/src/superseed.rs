//! Super-seeding: the origin's upload policy during a rollout.
//!
//! Goal: the origin uploads each piece about once, so its upload for a rollout stays near one
//! image size and the swarm's receivers serve the rest. Until every piece has left the origin
//! once (the first pass), the origin serves only pieces it has not sent yet and declines the
//! others: a receiver that asks for an already-sent piece gets a "busy" answer and finds it at
//! the peer that got it. After the first pass the origin serves anything, so a piece whose only
//! receiver vanished is never stuck.
//!
//! Non-goals: it does not know peers or time and does no I/O; the node asks it before each
//! upload and tells it when an upload was cut off before the piece arrived.

use crate::bitfield::Bitfield;
use crate::manifest::PieceIndex;

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
    /// Pieces that still have to leave once (never-travelling pieces are not counted).
    first_pass_left: u32,
}

impl SuperSeed {
    /// `travelling` marks the pieces that are sent at all (all-zero pieces never are).
    pub fn new(travelling: &Bitfield) -> Self {
        let mut sent = Bitfield::new(travelling.len());
        for piece in travelling.iter_zeros() {
            sent.set(piece);
        }
        Self {
            first_pass_left: travelling.count_ones(),
            sent,
        }
    }

    /// Decides one request and records an admitted piece as sent.
    pub fn admit(&mut self, piece: PieceIndex) -> Admission {
        if piece >= self.sent.len() {
            return Admission::Decline;
        }
        if self.sent.set(piece) {
            self.first_pass_left -= 1;
            Admission::Serve
        } else if self.first_pass_left == 0 {
            Admission::Serve
        } else {
            Admission::Decline
        }
    }

    /// An admitted upload broke off before the receiver had the piece: it counts as unsent.
    pub fn on_aborted(&mut self, piece: PieceIndex) {
        if self.first_pass_left > 0 && self.sent.get(piece) {
            self.sent.clear(piece);
            self.first_pass_left += 1;
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
        let mut travelling = Bitfield::full(4);
        travelling.clear(2); // an all-zero piece
        let mut s = SuperSeed::new(&travelling);
        assert_eq!(s.first_pass_left(), 3);
        assert_eq!(s.admit(0), Admission::Serve);
        assert_eq!(
            s.admit(0),
            Admission::Decline,
            "second copy waits for the first pass"
        );
        assert_eq!(s.admit(1), Admission::Serve);
        assert_eq!(s.admit(9), Admission::Decline, "out of range");
        s.on_aborted(1);
        assert_eq!(s.admit(1), Admission::Serve, "an aborted upload is retried");
        assert!(!s.first_pass_done());
        assert_eq!(s.admit(3), Admission::Serve);
        assert!(s.first_pass_done());
        assert_eq!(s.admit(0), Admission::Serve);
        s.on_aborted(0);
        assert!(
            s.first_pass_done(),
            "after the first pass nothing is re-counted"
        );
    }
}
