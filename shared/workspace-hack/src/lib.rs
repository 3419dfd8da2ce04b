//! Intentionally empty: this crate exists for its `Cargo.toml`, which enables in every Lambda
//! function's package the third-party features the workspace build enables (see there and
//! `scripts/check-features.py`).
