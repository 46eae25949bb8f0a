use super::*;
use base64::Engine as _;
use serde_json::json;

fn raw(v: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap()
}

async fn count(p: Prompt) -> u64 {
    Tokenizer::load().count_prompt(p).await
}

fn tokens(s: &str) -> u64 {
    Tokenizer::load().count(s)
}

async fn chat_tokens(messages: serde_json::Value, extras: &Extras<'_>, model: &str) -> u64 {
    count(chat(&raw(&messages), extras, model).unwrap()).await
}

/// Chat framing follows OpenAI's rule: 3 per message + 3 for the reply; text parts count.
#[tokio::test]
async fn chat_prompt_count() {
    let n = chat_tokens(
        json!([{"role":"system","content":"You are terse."},
               {"role":"user","content":[{"type":"text","text":"hello world"}]}]),
        &Extras::default(),
        "gpt-4o",
    )
    .await;
    assert_eq!(n, tokens("You are terse.") + tokens("hello world") + 9);
}

/// Tool and function definitions, schemas, predictions and forced tool choices are counted as
/// the JSON the client sent.
#[tokio::test]
async fn definitions_and_schemas_count() {
    let tools = json!([{"type":"function","function":{"name":"get_weather",
        "description":"Weather for a city, in detail","parameters":{"type":"object",
        "properties":{"city":{"type":"string","description":"The city"}},"required":["city"]}}}]);
    let schema = json!({"type":"json_schema","json_schema":{"name":"answer","schema":
        {"type":"object","properties":{"a":{"type":"string"}}}}});
    let prediction = json!({"type":"content","content":"the predicted answer text"});
    let choice = json!({"type":"function","function":{"name":"get_weather"}});
    let (t, s, p, c) = (raw(&tools), raw(&schema), raw(&prediction), raw(&choice));
    let msgs = json!([{"role":"user","content":"hi"}]);
    let base = chat_tokens(msgs.clone(), &Extras::default(), "gpt-4o").await;
    let extras = Extras {
        tools: Some(&t),
        response_format: Some(&s),
        prediction: Some(&p),
        tool_choice: Some(&c),
        ..Extras::default()
    };
    let with = chat_tokens(msgs.clone(), &extras, "gpt-4o").await;
    let expected = tokens(t.get()) + tokens(s.get()) + tokens(p.get()) + tokens(c.get());
    assert_eq!(with - base, expected);
    assert!(expected > 60, "{expected}");
    // "auto" costs nothing beyond the message.
    let auto = raw(&json!("auto"));
    let extras = Extras {
        tool_choice: Some(&auto),
        ..Extras::default()
    };
    assert_eq!(chat_tokens(msgs, &extras, "gpt-4o").await, base);
}

/// A content array with an element that is not a text part still counts its text parts (the
/// probe's `[text, "x"]` was counted as 0 before); a non-object element is a 400, as at OpenAI.
#[tokio::test]
async fn content_arrays_count_every_part() {
    let big = "lorem ipsum ".repeat(500);
    let n = chat_tokens(
        json!([{"role":"user","content":[{"type":"text","text":big},
            {"type":"mystery","payload":"abc def"}]}]),
        &Extras::default(),
        "gpt-4o",
    )
    .await;
    assert!(n >= tokens(&big) + tokens("abc def"), "{n}");
    for bad in [
        json!([{"role":"user","content":[{"type":"text","text":big}, "x"]}]),
        json!([{"role":"user","content":{"text":"x"}}]),
        json!(["just a string"]),
        json!({"role":"user"}),
    ] {
        let e = chat(&raw(&bad), &Extras::default(), "gpt-4o").unwrap_err();
        assert_eq!(e.param, "messages", "{bad}");
    }
    // Deep nesting inside a content array is refused, not forwarded uncounted.
    let mut deep = json!("x");
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let e = chat(
        &raw(&json!([{"role":"user","content":deep}])),
        &Extras::default(),
        "gpt-4o",
    )
    .unwrap_err();
    assert!(e.message.contains("content[0]"), "{}", e.message);
}

/// Unknown message fields (tool calls, audio references, future fields) count their JSON.
#[tokio::test]
async fn unknown_fields_count_raw() {
    let calls =
        json!([{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]);
    let n = chat_tokens(
        json!([{"role":"assistant","content":null,"tool_calls":calls,"future":{"x":"y z"}}]),
        &Extras::default(),
        "gpt-4o",
    )
    .await;
    let calls_raw = serde_json::to_string(&calls).unwrap();
    assert_eq!(n, 6 + tokens(&calls_raw) + tokens(r#"{"x":"y z"}"#));
}

fn png(w: u32, h: u32) -> String {
    // A PNG signature and IHDR chunk: all a size reader needs.
    let mut b = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13];
    b.extend_from_slice(b"IHDR");
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b)
    )
}

/// Images cost their documented tiles: exact when the data carries its size, the most an
/// image can cost for a link (never fetched), the base alone at `detail: low`.
#[tokio::test]
async fn images_cost_tiles() {
    let image = |url: &str, detail: &str| json!([{"role":"user","content":[{"type":"image_url","image_url":{"url":url,"detail":detail}}]}]);
    let framing = 6;
    // 1024×1024 → 768×768 → 4 tiles.
    let n = chat_tokens(
        image(&png(1024, 1024), "high"),
        &Extras::default(),
        "gpt-4o",
    )
    .await;
    assert_eq!(n - framing, 85 + 170 * 4);
    // 4096×1024 → 2048×512 → 4×1 tiles.
    let n = chat_tokens(
        image(&png(4096, 1024), "auto"),
        &Extras::default(),
        "gpt-4o",
    )
    .await;
    assert_eq!(n - framing, 85 + 170 * 4);
    let url = "https://example.com/cat.png";
    let n = chat_tokens(image(url, "auto"), &Extras::default(), "gpt-4o").await;
    assert_eq!(n - framing, 85 + 170 * 8, "unknown size: the maximum");
    let n = chat_tokens(image(url, "low"), &Extras::default(), "gpt-4o").await;
    assert_eq!(n - framing, 85);
    let n = chat_tokens(image(url, "high"), &Extras::default(), "gpt-4o-mini").await;
    assert_eq!(n - framing, 2833 + 5667 * 8);
    let n = chat_tokens(
        image(&png(64, 64), "high"),
        &Extras::default(),
        "gpt-4.1-mini",
    )
    .await;
    assert_eq!(n - framing, (4 * 1620u64).div_ceil(1000));
    // Responses' input_image shape.
    let p = responses(
        &raw(&json!([{"role":"user","content":[{"type":"input_image","image_url":url}]}])),
        None,
        &Extras::default(),
        "gpt-4o",
    )
    .unwrap();
    assert_eq!(count(p).await, 3 + 3 + 85 + 170 * 8);
}

/// Audio costs a token per 100 ms: from a WAV header when there is one, else at 32 kbit/s.
#[tokio::test]
async fn audio_costs_duration() {
    let mut wav =
        b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\x80\x3e\0\0\0\x7d\0\0\x02\0\x10\0data"
            .to_vec();
    wav.resize(44 + 32_000 * 2, 0); // 2 s of 16 kHz 16-bit mono: byte rate 32000
    let b64 = base64::engine::general_purpose::STANDARD.encode(&wav);
    let msg = |fmt: &str| json!([{"role":"user","content":[{"type":"input_audio","input_audio":{"data":b64,"format":fmt}}]}]);
    let n = chat_tokens(msg("wav"), &Extras::default(), "gpt-4o-audio-preview").await;
    assert_eq!(n - 6, 21, "2 s and a header");
    let n = chat_tokens(msg("mp3"), &Extras::default(), "gpt-4o-audio-preview").await;
    assert_eq!(n - 6, (64_044u64 * 10).div_ceil(4_000));
}

/// A PDF costs a page image and a page of text per page.
#[tokio::test]
async fn files_cost_pages() {
    let pdf = b"%PDF-1.4\n1 0 obj << /Type /Pages /Count 2 >>\n2 0 obj << /Type /Page >>\n3 0 obj << /Type/Page >>\n";
    let data = format!(
        "data:application/pdf;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(pdf)
    );
    let n = chat_tokens(
        json!([{"role":"user","content":[{"type":"file","file":{"file_data":data,"filename":"a.pdf"}}]}]),
        &Extras::default(),
        "gpt-4o",
    )
    .await;
    assert_eq!(n - 6, 2 * (1445 + 1000));
}

/// Completions and embeddings inputs in every accepted shape; anything else counts its JSON.
#[tokio::test]
async fn input_shapes() {
    let c = |v: serde_json::Value| count(input(&raw(&v), &Extras::default()));
    assert_eq!(c(json!([[1, 2, 3], [4, 5]])).await, 5);
    assert_eq!(c(json!([1, 2, 3])).await, 3);
    assert_eq!(c(json!(["a b", "c"])).await, tokens("a b") + tokens("c"));
    assert_eq!(
        c(json!({"odd": "shape"})).await,
        tokens(r#"{"odd":"shape"}"#)
    );
}

/// Responses inputs: messages as chat messages, other items (tool outputs) as their JSON,
/// instructions as text.
#[tokio::test]
async fn responses_items() {
    let items = json!([{"role":"user","content":"hello there"},
        {"type":"function_call_output","call_id":"c1","output":"result text"}]);
    let instr = raw(&json!("Be brief."));
    let p = responses(&raw(&items), Some(&instr), &Extras::default(), "gpt-4o").unwrap();
    let out_raw = serde_json::to_string(&items[1]).unwrap();
    assert_eq!(
        count(p).await,
        3 + 3 + tokens("hello there") + tokens(&out_raw) + tokens("Be brief.")
    );
    assert!(responses(&raw(&json!([5])), None, &Extras::default(), "gpt-4o").is_err());
}
