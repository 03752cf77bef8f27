use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::spec::TaskSpec;

const LIMITS: SpecLimits = SpecLimits {
    max_slots: 8,
    max_spec_bytes: 64 * 1024,
};

fn call(handler: &str) -> pb::TaskSpec {
    pb::TaskSpec::from(TaskSpec::call(handler, ""))
}

fn exec() -> pb::TaskSpec {
    pb::TaskSpec::from(TaskSpec::exec(["true"]))
}

fn exec_mut(spec: &mut pb::TaskSpec) -> &mut pb::ExecSpec {
    match &mut spec.kind {
        Some(pb::task_spec::Kind::Exec(exec)) => exec,
        _ => unreachable!("an exec spec"),
    }
}

/// The error's text, asserting it names `field`.
fn refused(spec: &pb::TaskSpec, field: &str) -> String {
    let err = LIMITS.check(spec).expect_err("over a limit");
    let text = err.to_string();
    assert!(text.contains(field), "{text} does not name {field}");
    text
}

#[test]
fn each_text_field_is_accepted_at_its_limit_and_refused_over_it() {
    type Set = fn(&mut pb::TaskSpec, String);
    let fields: [(&str, usize, pb::TaskSpec, Set); 5] = [
        ("call.handler", MAX_HANDLER_BYTES, call("x"), |s, v| {
            s.kind = Some(pb::task_spec::Kind::Call(pb::CallSpec {
                handler: v,
                input: Default::default(),
            }))
        }),
        ("name", MAX_TASK_NAME_BYTES, call("x"), |s, v| s.name = v),
        ("exec.cwd", MAX_CWD_BYTES, exec(), |s, v| {
            exec_mut(s).cwd = v
        }),
        ("labels (key)", MAX_LABEL_KEY_BYTES, call("x"), |s, v| {
            s.labels.insert(v, "v".into());
        }),
        (
            "labels (value)",
            MAX_LABEL_VALUE_BYTES,
            call("x"),
            |s, v| {
                s.labels.insert("k".into(), v);
            },
        ),
    ];
    for (field, max, base, set) in fields {
        let mut at = base.clone();
        set(&mut at, "a".repeat(max));
        assert_eq!(LIMITS.check(&at), Ok(()), "{field} at {max}");
        let mut over = base.clone();
        set(&mut over, "a".repeat(max + 1));
        let text = refused(&over, field);
        assert!(text.contains(&format!("at most {max}")), "{text}");
        let mut with_nul = base;
        set(&mut with_nul, "a\0b".into());
        assert!(refused(&with_nul, field).contains("NUL"));
    }
}

#[test]
fn env_names_values_and_counts_are_limited_in_both_maps() {
    for field in ["exec.env", "secret_env"] {
        let with = |entries: Vec<(String, String)>| {
            let mut spec = exec();
            let map = entries.into_iter().collect();
            match field {
                "exec.env" => exec_mut(&mut spec).env = map,
                _ => spec.secret_env = map,
            }
            spec
        };
        let name = |n: usize| "N".repeat(n);
        assert_eq!(
            LIMITS.check(&with(vec![(name(MAX_ENV_NAME_BYTES), "v".into())])),
            Ok(())
        );
        refused(
            &with(vec![(name(MAX_ENV_NAME_BYTES + 1), "v".into())]),
            field,
        );
        refused(&with(vec![("A\0".into(), "v".into())]), field);
        refused(&with(vec![("A".into(), "v\0".into())]), field);
        let many = |n: usize| (0..n).map(|i| (format!("V{i}"), String::new())).collect();
        assert_eq!(LIMITS.check(&with(many(MAX_ENV_ENTRIES))), Ok(()));
        refused(&with(many(MAX_ENV_ENTRIES + 1)), field);
    }
}

#[test]
fn argv_and_label_counts_are_limited() {
    let mut argv = exec();
    exec_mut(&mut argv).argv = vec!["a".into(); MAX_ARGV_ENTRIES];
    assert_eq!(LIMITS.check(&argv), Ok(()));
    exec_mut(&mut argv).argv.push("a".into());
    refused(&argv, "exec.argv");
    exec_mut(&mut argv).argv = vec!["true".into(), "a\0".into()];
    refused(&argv, "exec.argv");
    let mut labels = call("x");
    labels.labels = (0..MAX_LABELS)
        .map(|i| (i.to_string(), String::new()))
        .collect();
    assert_eq!(LIMITS.check(&labels), Ok(()));
    labels.labels.insert("one more".into(), String::new());
    refused(&labels, "labels");
}

#[test]
fn slots_no_node_may_declare_are_refused_naming_the_flag() {
    let mut spec = call("x");
    spec.slots = LIMITS.max_slots;
    assert_eq!(LIMITS.check(&spec), Ok(()));
    spec.slots = u32::MAX;
    let text = refused(&spec, "slots");
    assert!(
        text.contains("--max-node-slots") && text.contains("8"),
        "{text}"
    );
}

#[test]
fn a_spec_over_the_size_limit_is_too_large_and_one_at_it_is_not() {
    let mut spec = call("x");
    let base = spec.encoded_len();
    let set_input = |spec: &mut pb::TaskSpec, total: usize| {
        // The input's length prefix grows with it: find the length whose
        // encoding is exactly `total`.
        let mut n = total - base;
        loop {
            spec.kind = Some(pb::task_spec::Kind::Call(pb::CallSpec {
                handler: "x".into(),
                input: vec![0u8; n].into(),
            }));
            match spec.encoded_len() {
                len if len > total => n -= 1,
                _ => break,
            }
        }
    };
    set_input(&mut spec, LIMITS.max_spec_bytes);
    assert_eq!(spec.encoded_len(), LIMITS.max_spec_bytes);
    assert_eq!(LIMITS.check(&spec), Ok(()));
    spec.name = "y".into();
    let err = LIMITS.check(&spec).unwrap_err();
    assert_eq!(
        err,
        ConversionError::TooLarge {
            what: "task spec",
            size: LIMITS.max_spec_bytes + 3,
            limit: LIMITS.max_spec_bytes
        }
    );
    assert!(err.to_string().contains("--max-message-size"), "{err}");
}

#[test]
fn a_long_node_text_is_cut_with_a_marker_on_a_char_boundary() {
    let mut short = "fine".to_owned();
    truncate_node_text(&mut short);
    assert_eq!(short, "fine");
    let mut long = "é".repeat(MAX_NODE_TEXT_BYTES);
    truncate_node_text(&mut long);
    assert!(long.len() <= MAX_NODE_TEXT_BYTES, "{}", long.len());
    assert!(long.ends_with(TRUNCATED_MARKER));
}

#[test]
fn a_register_is_held_to_the_name_label_and_handler_limits() {
    let register = |name: String, handler: String| pb::Register {
        name,
        handlers: vec![handler],
        ..pb::Register::default()
    };
    let fine = register(
        "a".repeat(MAX_NODE_NAME_BYTES),
        "h".repeat(MAX_HANDLER_BYTES),
    );
    assert_eq!(check_register(&fine), Ok(()));
    for (bad, field) in [
        (
            register("a".repeat(MAX_NODE_NAME_BYTES + 1), "h".into()),
            "name",
        ),
        (register("n\0".into(), "h".into()), "name"),
        (
            register("n".into(), "h".repeat(MAX_HANDLER_BYTES + 1)),
            "handlers",
        ),
        (register("n".into(), "h\0".into()), "handlers"),
    ] {
        let err = check_register(&bad).expect_err("over a limit").to_string();
        assert!(err.contains(field), "{err}");
    }
    let mut many = fine;
    many.handlers = vec!["h".into(); MAX_NODE_HANDLERS + 1];
    assert!(check_register(&many).is_err());
}

#[test]
fn a_register_lists_at_most_four_times_the_slot_limit_and_the_kept_results_as_running() {
    let max = 4;
    let limit = 4 * 4 + MAX_NODE_RESULTS_KEPT;
    assert_eq!(max_register_running(max), limit);
    let running = |n: usize| pb::Register {
        running: vec![pb::AttemptRef::default(); n],
        ..pb::Register::default()
    };
    assert_eq!(check_register_running(&running(limit), max), Ok(()));
    let err = check_register_running(&running(limit + 1), max)
        .expect_err("over the limit")
        .to_string();
    assert!(err.contains("running"), "{err}");
    assert!(err.contains(&limit.to_string()), "{err}");
    // No overflow at the largest setting.
    assert!(max_register_running(u32::MAX) > u32::MAX as usize);
}

fn text_field() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        "[a-z=\\x00 ]{0,8}",
        (0usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

fn arbitrary_spec() -> impl Strategy<Value = pb::TaskSpec> {
    let map = || prop::collection::btree_map(text_field(), text_field(), 0..4);
    let exec = (
        prop::collection::vec(text_field(), 0..4),
        map(),
        text_field(),
    )
        .prop_map(|(argv, env, cwd)| {
            pb::task_spec::Kind::Exec(pb::ExecSpec {
                argv,
                env,
                cwd,
                stdin: Default::default(),
            })
        });
    let call = (text_field(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(h, i)| {
        pb::task_spec::Kind::Call(pb::CallSpec {
            handler: h,
            input: i.into(),
        })
    });
    let kind = prop::option::of(prop_oneof![exec, call]);
    let duration = prop::option::of((any::<i64>(), any::<i32>()))
        .prop_map(|d| d.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }));
    (
        kind,
        any::<u32>(),
        map(),
        duration,
        any::<u32>(),
        text_field(),
        map(),
    )
        .prop_map(
            |(kind, slots, labels, timeout, max_attempts, name, secret_env)| pb::TaskSpec {
                kind,
                slots,
                labels,
                schedule_timeout: timeout,
                timeout,
                max_attempts,
                name,
                secret_env,
                trace: None,
                ..Default::default()
            },
        )
}

proptest! {
    /// Any wire spec either passes both checks, and then is within every
    /// limit, or is refused with an error naming what is wrong; nothing
    /// panics.
    #[test]
    fn any_spec_is_accepted_within_the_limits_or_refused(spec in arbitrary_spec()) {
        let checked = LIMITS.check(&spec);
        let converted = TaskSpec::try_from(spec.clone());
        if let (Ok(()), Ok(converted)) = (checked, converted) {
            prop_assert!(converted.slots >= 1 && converted.slots <= LIMITS.max_slots);
            prop_assert!(spec.encoded_len() <= LIMITS.max_spec_bytes);
            prop_assert!(converted.name.len() <= MAX_TASK_NAME_BYTES);
            prop_assert!(!converted.name.contains('\0'));
        }
    }

    /// Arbitrary bytes decoded as a spec: the decoder and both checks
    /// never panic.
    #[test]
    fn arbitrary_bytes_never_panic_the_spec_checks(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(spec) = pb::TaskSpec::decode(bytes.as_slice()) {
            let _ = LIMITS.check(&spec);
            let _ = TaskSpec::try_from(spec);
        }
    }
}
