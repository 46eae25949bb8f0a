//! The shipped example configuration stays valid.

/// `examples/tollgate.toml` parses and validates.
#[test]
fn example_config_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/tollgate.toml"
    ))
    .unwrap();
    let c = tollgate_common::Config::from_toml(&text).unwrap();
    assert_eq!(c.backends.len(), 2);
    assert_eq!(c.consumers[0].tpm, Some(50000));
}
