//! Policy (skeleton).
