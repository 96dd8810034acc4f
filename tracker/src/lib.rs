//! Tracker logic (registry of holders, peer ordering, catalogue of announcements).
