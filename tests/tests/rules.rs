//! Context rules end to end with the real `fedrec-coordinator` binary: `init` creates the rules signing key, `rules publish` signs an operator's TOML file, `serve` distributes it over QUIC, and a device verifies it with the public key from the state directory and chooses variants.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use fedrec_client::net::{Device, NetError};
use fedrec_client::rules::{self, Context, EvalContext, FetchError, Fetched};
use fedrec_shared::ModelShape;
use fedrec_shared::wire::ErrorCode;
use fedrec_shared::wire::rules::ActivityWindow;
use fedrec_tests::coordinator::describe;
use fedrec_tests::{CoordinatorDir, CoordinatorProcess, decode_hex};

const RULES: &str = r#"
[[slot]]
name = "home_banner"
default = "generic"

[[slot.rule]]
variant = "late_night"
priority = 10
time = "22:00-06:00"

[[slot.rule]]
variant = "weekend_berlin"
priority = 5
weekdays = ["sat", "sun"]
locations = ["Berlin"]

[[slot.rule]]
variant = "loyal_tablet"
priority = 5
device_types = ["tablet"]
segments = [0, 1, 2, 3, 4, 5, 6, 7]
activity = [{ kind = "any", hours = 24, at_least = 0 }]
"#;

/// `init`, a config that listens on free ports without noise (no budget needed), one
/// enrolled device; its token.
fn prepare(dir: &Path) -> (CoordinatorDir, Vec<u8>) {
    let state = CoordinatorDir::init_plain(dir, &[("noise_multiplier = 1.0", "noise_multiplier = 0.0")]);
    let token = state.enroll(1).remove(0);
    (state, token)
}

/// `rules publish` of `toml`, which must succeed; the version it tells the operator.
fn publish(state: &CoordinatorDir, toml: &str) -> u64 {
    let out = state.publish_rules(toml);
    assert!(out.status.success(), "{}", describe(&out));
    let said = String::from_utf8(out.stderr).expect("UTF-8 output");
    let version = said
        .split_once("published rules version ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    version.unwrap_or_else(|| panic!("`rules publish` names the version: {said}"))
}

fn device(serve: &CoordinatorProcess, token: Vec<u8>) -> Device {
    serve.device(token, ModelShape { n_items: 1000, dim: 16, n_segments: 8 }, Duration::from_secs(10))
}

#[tokio::test]
async fn a_published_ruleset_reaches_a_device_verified_and_chooses_variants() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (state, token) = prepare(dir);

    // `init` made the key pair: the private key readable by the owner only.
    let key_mode =
        std::fs::metadata(dir.join("rules_signing.key")).expect("init writes the key").permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let public = std::fs::read(dir.join("rules_signing.pub")).expect("init writes the public key");
    assert_eq!(public.len(), 32);
    assert_eq!(decode_hex(state.run(&["rules", "key"]).trim()), public, "`rules key` prints it in hex");

    // Nothing published yet: the coordinator says so.
    {
        let serve = state.serve().await;
        assert!(serve.lines().iter().any(|l| l.contains("no rules published")), "{:#?}", serve.lines());
        let d = device(&serve, token.clone());
        assert!(matches!(rules::fetch(&d, &public, None).await, Ok(Fetched::NoRuleset)));
    }

    // Two publications: the version increases. An invalid file changes nothing.
    let first = publish(&state, RULES);
    let version = publish(&state, RULES);
    assert!(version > first, "{version} after {first}");
    let stored = std::fs::read(dir.join("rules.signed")).expect("publish stores the signed ruleset");
    let bad = state.publish_rules(
        "[[slot]]\nname = \"s\"\ndefault = \"d\"\n[[slot.rule]]\nvariant = \"v\"\ntime = \"25:00-01:00\"\n",
    );
    assert!(!bad.status.success(), "an invalid time is refused");
    let typo = state.publish_rules(
        "[[slot]]\nname = \"s\"\ndefault = \"d\"\n[[slot.rule]]\nvariant = \"v\"\nlocation = [\"x\"]\n",
    );
    assert!(!typo.status.success(), "an unknown key is refused");
    assert_eq!(std::fs::read(dir.join("rules.signed")).expect("still there"), stored);

    let serve = state.serve().await;
    let serving = format!("serving rules version {version}");
    assert!(serve.lines().iter().any(|l| l.contains(&serving)), "{:#?}", serve.lines());
    let d = device(&serve, token.clone());
    let Fetched::Updated(ruleset) = rules::fetch(&d, &public, None).await.expect("the fetch succeeds") else {
        panic!("a fresh device gets the ruleset");
    };
    assert_eq!(ruleset.version(), version);
    assert_eq!(ruleset.signed_bytes(), stored, "the device gets the stored bytes");

    let none = |_: ActivityWindow| 0u32;
    let choose = |context: &Context, segment| {
        let ctx = EvalContext { context, segment, activity: &none };
        ruleset.choose("home_banner", &ctx).expect("a known slot").to_owned()
    };
    assert_eq!(choose(&Context::at(23, 30, 2), None), "late_night");
    let saturday_berlin = Context { location: Some("berlin".into()), ..Context::at(15, 0, 5) };
    assert_eq!(choose(&saturday_berlin, None), "weekend_berlin");
    let tablet = Context { device_type: Some("Tablet".into()), ..Context::at(15, 0, 1) };
    assert_eq!(choose(&tablet, Some(3)), "loyal_tablet");
    assert_eq!(choose(&tablet, None), "generic", "no segment yet");
    assert_eq!(choose(&Context::at(12, 0, 0), Some(3)), "generic");

    // Holding the current version: unchanged. An older one: the new one.
    assert!(matches!(rules::fetch(&d, &public, Some(version)).await, Ok(Fetched::Unchanged)));
    assert!(matches!(
        rules::fetch(&d, &public, Some(first)).await,
        Ok(Fetched::Updated(r)) if r.version() == version
    ));
    // A device that somehow holds a newer version refuses to go back.
    let newer = version + 1;
    assert!(matches!(
        rules::fetch(&d, &public, Some(newer)).await,
        Err(FetchError::Rules(rules::RulesError::Rollback { installed, offered }))
            if installed == newer && offered == version
    ));
    // Another key (an app configured for another coordinator) refuses it.
    assert!(matches!(
        rules::fetch(&d, &[7; 32], None).await,
        Err(FetchError::Rules(rules::RulesError::BadSignature))
    ));
    // Without a valid token the coordinator refuses to answer.
    let stranger = device(&serve, vec![0; 40]);
    match rules::fetch(&stranger, &public, None).await {
        Err(FetchError::Net(NetError::Refused { code, .. })) => assert_eq!(code, ErrorCode::BadToken),
        other => panic!("a bad token is refused: {other:?}\n{:#?}", serve.lines()),
    }
}

#[test]
fn a_state_directory_without_a_rules_key_gets_one_at_the_first_publication() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (state, _) = prepare(dir);
    // A directory made before rules existed.
    std::fs::remove_file(dir.join("rules_signing.key")).expect("exists");
    std::fs::remove_file(dir.join("rules_signing.pub")).expect("exists");
    let version = publish(&state, RULES);
    let public = std::fs::read(dir.join("rules_signing.pub")).expect("publish creates the key");
    let signed = std::fs::read(dir.join("rules.signed")).expect("publish stores the ruleset");
    assert_eq!(rules::verify(&signed, &public).expect("signed with the new key").version(), version);
    let key_mode = std::fs::metadata(dir.join("rules_signing.key")).expect("exists").permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);
    // `init` refuses to run twice, and so the key is never replaced behind the apps' back.
    assert!(!state.command(&["init"]).status.success());
    assert_eq!(std::fs::read(dir.join("rules_signing.pub")).expect("exists"), public);
}

#[test]
fn versions_keep_increasing_when_rules_signed_is_lost_or_restored_from_a_backup() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (state, _) = prepare(dir);
    let public = std::fs::read(dir.join("rules_signing.pub")).expect("init writes the public key");
    let signed = dir.join("rules.signed");

    let first = publish(&state, RULES);
    let backup = std::fs::read(&signed).expect("publish stores the ruleset");
    let second = publish(&state, RULES);
    assert!(second > first, "{second} after {first}");

    // Restored from an older backup: the next publication is still newer than the lost one.
    std::fs::write(&signed, &backup).expect("writable");
    let after_restore = publish(&state, RULES);
    assert!(after_restore > second, "{after_restore} after {second}");

    // Deleted: likewise.
    std::fs::remove_file(&signed).expect("exists");
    let after_loss = publish(&state, RULES);
    assert!(after_loss > after_restore, "{after_loss} after {after_restore}");

    // A device holding the lost version takes the new one.
    let bytes = std::fs::read(&signed).expect("publish stores the ruleset");
    let update = rules::verify_update(&bytes, &public, Some(after_restore)).expect("not a rollback");
    assert_eq!(update.version(), after_loss);
}
