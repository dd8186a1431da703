//! Integration test harness lives in tests/it.
