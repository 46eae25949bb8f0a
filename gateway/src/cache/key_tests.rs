use super::*;
use serde_json::json;

fn rule(toml: &str) -> CacheConfig {
    let c =
        tollgate_common::Config::from_toml(&format!("[[cache]]\nname = \"c\"\n{toml}")).unwrap();
    c.cache[0].clone()
}

fn key(body: serde_json::Value) -> Result<String, Skip> {
    inspect(
        Operation::Chat,
        "gpt-4o",
        body.to_string().as_bytes(),
        &rule(""),
    )
    .map(|k| k.key)
}

/// Field order, whitespace, transport-only fields and `n = 1` do not change the key;
/// every answer-changing parameter and the system message do.
#[test]
fn the_key_keeps_what_changes_the_answer() {
    let base = json!({"model": "gpt-4o", "max_tokens": 5, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]});
    let k = key(base.clone()).unwrap();
    let same = json!({"messages": [{"content": " Be  brief.", "role": "system"},
        {"role": "user", "content": "Hi\nthere "}], "max_tokens": 5, "stream": true,
        "stream_options": {"include_usage": true}, "user": "u1", "n": 1, "model": "x"});
    assert_eq!(key(same).unwrap(), k);
    for (f, v) in [
        ("max_tokens", json!(6)),
        ("temperature", json!(0.2)),
        ("seed", json!(1)),
        ("top_p", json!(0.5)),
        ("stop", json!(["\n"])),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut b = base.clone();
        b[f] = v;
        assert_ne!(key(b).unwrap(), k, "{f}");
    }
    let mut sys = base.clone();
    sys["messages"][0]["content"] = json!("Be long.");
    assert_ne!(key(sys).unwrap(), k);
    let other_model = inspect(
        Operation::Chat,
        "gpt-4o-mini",
        base.to_string().as_bytes(),
        &rule(""),
    );
    assert_ne!(other_model.unwrap().key, k);
}

/// n > 1, tools and tool results, a high temperature and `previous_response_id` skip.
#[test]
fn unsafe_requests_skip() {
    let m = json!([{"role": "user", "content": "x"}]);
    assert_eq!(key(json!({"messages": m, "n": 2})), Err(Skip::Choices));
    assert_eq!(
        key(json!({"messages": m, "temperature": 0.9})),
        Err(Skip::Temperature)
    );
    assert!(key(json!({"messages": m, "temperature": 0.7})).is_ok());
    assert_eq!(key(json!({"messages": m, "tools": []})), Err(Skip::Tools));
    let result = json!([{"role": "tool", "tool_call_id": "1", "content": "42"}]);
    assert_eq!(key(json!({"messages": result})), Err(Skip::Tools));
    let with_tools = rule("cache_tools = true");
    let b = json!({"messages": m, "tools": []}).to_string();
    assert!(inspect(Operation::Chat, "m", b.as_bytes(), &with_tools).is_ok());
    let r = json!({"input": "x", "previous_response_id": "resp_1"}).to_string();
    assert_eq!(
        inspect(Operation::Responses, "m", r.as_bytes(), &rule("")).map(|k| k.key),
        Err(Skip::Conversation)
    );
}

/// The semantic text keeps the last `max_message_count` messages, without system messages
/// when `ignore_system_messages`.
#[test]
fn semantic_text_follows_the_policy() {
    let doc = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": "three"}]});
    let doc = doc.as_object().unwrap();
    let all = rule("");
    assert_eq!(
        semantic_text(Operation::Chat, doc, &all),
        "system: Be brief. user: one assistant: two user: three"
    );
    let last = rule("ignore_system_messages = true\nmax_message_count = 2");
    assert_eq!(
        semantic_text(Operation::Chat, doc, &last),
        "assistant: two user: three"
    );
}

mod pinned {
    use super::*;

    /// The key of a fixed request does not change between releases (entries written by the
    /// previous version keep hitting after an upgrade): pinned here.
    #[test]
    fn key_is_stable() {
        let body = r#"{"model":"gpt-4o","temperature":0,"user":"u1","stream":true,
            "messages":[{"role":"system","content":"  Be   brief.\n"},
            {"role":"user","content":[{"type":"text","text":"Héllo\u00a0 wörld\t!"}]}],
            "max_tokens":16,"n":1,"metadata":{"b":[1,2.5,null,true],"a":"x\"y"}}"#;
        let rule = tollgate_common::Config::from_toml("[[cache]]\nname = \"c\"\n").unwrap();
        let k = inspect(Operation::Chat, "gpt-4o", body.as_bytes(), &rule.cache[0]).unwrap();
        assert_eq!(k.key, "6edfbda0add6db1a5d46a3ab3752bc8d");
    }

    /// The allocation-free check and the one-pass collapse agree with `split_whitespace` on
    /// every kind of whitespace.
    #[test]
    fn collapsed_check_agrees() {
        for s in [
            "",
            " ",
            "a",
            "a b",
            "a  b",
            " a",
            "a ",
            "a\tb",
            "a\u{a0}b",
            "a\nb",
            "héllo wörld",
            "  ",
            "x y z",
            "x\u{2003}y",
            "\u{85}a\u{3000}",
            "\u{b}a\u{c}b\r\n",
            " é  ü ",
            "a\u{2028}\u{2029}b\u{200b}c",
            "日本 語\u{a0}\u{a0}テキスト",
        ] {
            let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(is_collapsed(s), collapsed == s, "{s:?}");
        }
    }
}
