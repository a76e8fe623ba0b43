//! Tests of the C ABI through the extern functions, as C calls them: misuse, panics, threads and cancellation.

use std::ffi::{CStr, CString, c_char};
use std::net::UdpSocket;
use std::ptr::{null, null_mut};
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, RoundModel};

use super::*;
use crate::error::SdkError;

const KEY: [u8; 32] = [7; 32];
const SHAPE: ModelShape = ModelShape { n_items: 50, dim: 4, n_segments: 2 };

/// The message of an error, then frees it.
fn take_message(err: *mut FedrecError) -> String {
    assert!(!err.is_null(), "an error was reported");
    // SAFETY: `err` is a live error from the SDK; its message is a NUL-terminated string it owns.
    let message = unsafe { CStr::from_ptr((*err).message) }.to_str().expect("UTF-8").to_owned();
    // SAFETY: freed once.
    unsafe { fedrec_error_free(err) };
    message
}

fn c_path(dir: &std::path::Path) -> CString {
    CString::new(dir.to_str().expect("a UTF-8 temp path")).expect("no NUL in a path")
}

/// Opens a handle on `dir` with `options` (NULL for the defaults); panics on failure.
fn open(dir: &std::path::Path, options: *const FedrecOpenOptions) -> *mut FedrecSdk {
    let (mut sdk, mut err) = (null_mut(), null_mut());
    // SAFETY: valid arguments, borrowed for the call.
    let status = unsafe {
        fedrec_sdk_open(c_path(dir).as_ptr(), KEY.as_ptr(), KEY.len(), options, &mut sdk, &mut err)
    };
    if status != FEDREC_OK {
        panic!("open failed with {status}: {}", take_message(err));
    }
    sdk
}

/// A handle with both consents and an installed model.
fn open_with_model(dir: &std::path::Path) -> *mut FedrecSdk {
    let sdk = open(dir, null());
    // SAFETY: a live handle.
    assert_eq!(unsafe { fedrec_sdk_set_consent(sdk, true, true, null_mut()) }, FEDREC_OK);
    let init = ModelInit { factor_std: 0.3, global_mean: 0.0, centroid_scale: 0.1 };
    let model = GlobalModel::init(SHAPE, init, &mut seeded_rng(3)).expect("a valid shape");
    // SAFETY: a live handle (tests reach the SDK behind it to install a model).
    unsafe { &*sdk }.sdk.install_model(RoundModel::new(1, model)).expect("the model fits");
    sdk
}

#[test]
fn status_constants_are_the_sdk_codes() {
    let pairs = [
        (FEDREC_ERR_INVALID_ARGUMENT, SdkError::InvalidArgument(String::new())),
        (FEDREC_ERR_CONSENT_REQUIRED, SdkError::ConsentRequired { purpose: "training" }),
        (FEDREC_ERR_WRONG_KEY_OR_CORRUPT, SdkError::WrongKeyOrCorrupt),
        (FEDREC_ERR_STORE_CORRUPT, SdkError::StoreCorrupt(String::new())),
        (FEDREC_ERR_UNSUPPORTED_VERSION, SdkError::UnsupportedVersion { found: 2, supported: 1 }),
        (FEDREC_ERR_STORE_IO, SdkError::StoreIo(String::new())),
        (FEDREC_ERR_TOO_LARGE, SdkError::TooLarge(String::new())),
        (FEDREC_ERR_NO_MODEL, SdkError::NoModel),
        (FEDREC_ERR_NOT_CONFIGURED, SdkError::NotConfigured("")),
        (FEDREC_ERR_NETWORK, SdkError::Network(String::new())),
        (FEDREC_ERR_NOT_ELIGIBLE, SdkError::NotEligible),
        (FEDREC_ERR_CANCELLED, SdkError::Cancelled),
        (FEDREC_ERR_RULES_REJECTED, SdkError::RulesRejected(String::new())),
        (FEDREC_ERR_CLOSED, SdkError::Closed),
        (FEDREC_ERR_BUSY, SdkError::Busy),
        (FEDREC_ERR_INTERNAL, SdkError::Internal(String::new())),
        (FEDREC_ERR_LOCKED, SdkError::Locked),
        (FEDREC_ERR_ROLLBACK, SdkError::Rollback(String::new())),
    ];
    for (constant, error) in &pairs {
        assert_eq!(*constant, error.code(), "{error:?}");
    }
    for abi in [FEDREC_ERR_NULL_POINTER, FEDREC_ERR_INVALID_UTF8, FEDREC_ERR_PANIC] {
        assert!(pairs.iter().all(|(c, _)| *c != abi) && abi != FEDREC_OK);
    }
}

#[test]
fn a_panic_becomes_a_status_and_an_error() {
    let mut err = null_mut();
    let status = call(&mut err, || panic!("a bug inside the SDK"));
    assert_eq!(status, FEDREC_ERR_PANIC);
    // SAFETY: the error `call` just reported.
    assert_eq!(unsafe { (*err).code }, FEDREC_ERR_PANIC);
    assert!(take_message(err).contains("internal error"));
    // Without an error out-parameter the status still tells.
    assert_eq!(call(null_mut(), || panic!("again")), FEDREC_ERR_PANIC);
}

#[test]
fn null_pointers_are_refused_with_a_status() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut err = null_mut();
    let (mut flag, mut id, mut distance) = (false, 0u32, 0f32);
    // SAFETY: every pointer is NULL or valid; NULL where the test says so.
    unsafe {
        assert_eq!(fedrec_sdk_set_consent(null(), true, true, &mut err), FEDREC_ERR_NULL_POINTER);
        assert_eq!(take_message(err), "sdk is NULL");
        assert_eq!(
            fedrec_sdk_segment(null(), &mut flag, &mut id, &mut distance, null_mut()),
            FEDREC_ERR_NULL_POINTER
        );
        let mut sdk = null_mut();
        assert_eq!(
            fedrec_sdk_open(null(), KEY.as_ptr(), 32, null(), &mut sdk, null_mut()),
            FEDREC_ERR_NULL_POINTER
        );
        let path = c_path(dir.path());
        assert_eq!(
            fedrec_sdk_open(path.as_ptr(), KEY.as_ptr(), 32, null(), null_mut(), null_mut()),
            FEDREC_ERR_NULL_POINTER
        );
        assert!(sdk.is_null());
        // Nothing was created by the refused calls.
        assert_eq!(std::fs::read_dir(dir.path()).expect("readable").count(), 0);
    }
    let sdk = open_with_model(dir.path());
    // SAFETY: a live handle; NULL out-pointers on purpose.
    unsafe {
        assert_eq!(fedrec_sdk_recommend(sdk, 5, null(), null_mut(), &mut err), FEDREC_ERR_NULL_POINTER);
        assert_eq!(take_message(err), "out is NULL");
        assert_eq!(
            fedrec_sdk_segment(sdk, &mut flag, null_mut(), &mut distance, null_mut()),
            FEDREC_ERR_NULL_POINTER
        );
        assert_eq!(fedrec_sdk_export(sdk, null_mut(), null_mut()), FEDREC_ERR_NULL_POINTER);
        let opts =
            FedrecRecommendOptions { exclude: null(), exclude_len: 3, ..fedrec_recommend_options_default() };
        let mut recs = FedrecRecommendations { items: null_mut(), len: 0 };
        assert_eq!(fedrec_sdk_recommend(sdk, 5, &opts, &mut recs, null_mut()), FEDREC_ERR_NULL_POINTER);
        fedrec_sdk_close(sdk);
    }
}

#[test]
fn bad_strings_lengths_and_kinds_are_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut err = null_mut();
    let mut sdk = null_mut();
    let invalid = b"/tmp/\xff\xfe\0";
    let path = c_path(dir.path());
    // SAFETY: valid pointers; the contents are what is wrong.
    unsafe {
        let status = fedrec_sdk_open(invalid.as_ptr().cast(), KEY.as_ptr(), 32, null(), &mut sdk, &mut err);
        assert_eq!(status, FEDREC_ERR_INVALID_UTF8);
        assert_eq!(take_message(err), "dir is not valid UTF-8");
        let status = fedrec_sdk_open(path.as_ptr(), KEY.as_ptr(), 31, null(), &mut sdk, &mut err);
        assert_eq!(status, FEDREC_ERR_INVALID_ARGUMENT);
        assert_eq!(take_message(err), "key must be exactly 32 bytes");
        assert!(sdk.is_null());
    }
    let sdk = open_with_model(dir.path());
    // SAFETY: a live handle and valid pointers.
    unsafe {
        assert_eq!(fedrec_sdk_record(sdk, 1, 4, 1.0, 0, null_mut()), FEDREC_ERR_INVALID_ARGUMENT);
        assert_eq!(
            fedrec_sdk_record(sdk, 1, FEDREC_EVENT_VIEW, f32::NAN, 0, null_mut()),
            FEDREC_ERR_INVALID_ARGUMENT
        );
        assert_eq!(fedrec_sdk_record(sdk, 1, FEDREC_EVENT_CUSTOM + 255, 1.0, 0, null_mut()), FEDREC_OK);
        assert_eq!(
            fedrec_sdk_record(sdk, 1, FEDREC_EVENT_CUSTOM + 256, 1.0, 0, null_mut()),
            FEDREC_ERR_INVALID_ARGUMENT
        );
        let tags = [c"drama".as_ptr(), invalid.as_ptr().cast::<c_char>()];
        assert_eq!(fedrec_sdk_set_item_tags(sdk, 1, tags.as_ptr(), 2, null_mut()), FEDREC_ERR_INVALID_UTF8);
        // A second handle on a folder in use: refused, whatever the key.
        let mut other = null_mut();
        let status = fedrec_sdk_open(path.as_ptr(), KEY.as_ptr(), 32, null(), &mut other, &mut err);
        assert_eq!(status, FEDREC_ERR_LOCKED);
        assert!(take_message(err).contains("in use"));
        assert!(other.is_null());
        assert_eq!(fedrec_sdk_erase(path.as_ptr(), &mut err), FEDREC_ERR_LOCKED);
        take_message(err);
        fedrec_sdk_close(sdk);
        // A wrong key on an existing store: an error, and the store is intact.
        let wrong = [8u8; 32];
        let status = fedrec_sdk_open(path.as_ptr(), wrong.as_ptr(), 32, null(), &mut other, &mut err);
        assert_eq!(status, FEDREC_ERR_WRONG_KEY_OR_CORRUPT);
        assert!(!take_message(err).contains(dir.path().to_str().expect("UTF-8")), "no path in messages");
        // An empty path would put the store in the working directory: refused.
        let status = fedrec_sdk_open(c"".as_ptr(), KEY.as_ptr(), 32, null(), &mut other, &mut err);
        assert_eq!(status, FEDREC_ERR_INVALID_ARGUMENT);
        assert!(take_message(err).contains("dir must not be empty"));
        assert!(other.is_null());
        assert_eq!(fedrec_sdk_erase(c"".as_ptr(), &mut err), FEDREC_ERR_INVALID_ARGUMENT);
        take_message(err);
    }
    let sdk = open(dir.path(), null());
    let mut json = null_mut();
    // SAFETY: a live handle; the JSON is freed once.
    unsafe {
        assert_eq!(fedrec_sdk_export(sdk, &mut json, null_mut()), FEDREC_OK);
        let text = CStr::from_ptr(json).to_str().expect("UTF-8");
        assert!(text.contains("\"kind\": \"custom\""), "the event recorded before survived: {text}");
        fedrec_string_free(json);
        fedrec_sdk_close(sdk);
    }
}

/// `&FedrecSdk` crosses threads as C would share the pointer.
#[test]
fn one_handle_serves_many_threads() {
    const THREADS: u32 = 4;
    const EVENTS: u32 = 25;
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = open_with_model(dir.path());
    // SAFETY: the handle stays live until the close below, after every thread has ended.
    let shared: &FedrecSdk = unsafe { &*sdk };
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            scope.spawn(move || {
                let sdk: *const FedrecSdk = shared;
                for i in 0..EVENTS {
                    // 20 distinct items of 50: recommendations always have 5 unconsumed to pick.
                    let item = t * 5 + i % 5;
                    let mut recs = FedrecRecommendations { items: null_mut(), len: 0 };
                    let (mut found, mut id, mut distance) = (false, 0u32, 0f32);
                    let mut json = null_mut();
                    // SAFETY: a live handle, valid out-pointers, results freed once.
                    unsafe {
                        assert_eq!(
                            fedrec_sdk_record(
                                sdk,
                                item,
                                FEDREC_EVENT_CLICK,
                                1.0,
                                1_000 + i64::from(i),
                                null_mut()
                            ),
                            FEDREC_OK
                        );
                        assert_eq!(fedrec_sdk_recommend(sdk, 5, null(), &mut recs, null_mut()), FEDREC_OK);
                        assert_eq!(recs.len, 5);
                        fedrec_recommendations_free(&mut recs);
                        assert_eq!(
                            fedrec_sdk_segment(sdk, &mut found, &mut id, &mut distance, null_mut()),
                            FEDREC_OK
                        );
                        assert!(found && id < SHAPE.n_segments as u32);
                        assert_eq!(fedrec_sdk_explain(sdk, item, &mut json, null_mut()), FEDREC_OK);
                        fedrec_string_free(json);
                    }
                }
            });
        }
    });
    let mut json = null_mut();
    // SAFETY: the threads have ended; the handle is live until closed here.
    let text = unsafe {
        assert_eq!(fedrec_sdk_export(sdk, &mut json, null_mut()), FEDREC_OK);
        let text = CStr::from_ptr(json).to_str().expect("UTF-8").to_owned();
        fedrec_string_free(json);
        fedrec_sdk_close(sdk);
        text
    };
    let doc: serde_json::Value = serde_json::from_str(&text).expect("export is JSON");
    let events = doc["events"].as_array().expect("an events array");
    assert_eq!(events.len(), (THREADS * EVENTS) as usize, "every event of every thread was kept");
}

#[test]
fn recommendations_are_rust_allocated_and_freed_once() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = open_with_model(dir.path());
    let mut recs = FedrecRecommendations { items: null_mut(), len: 0 };
    // SAFETY: a live handle; the result is freed once, then freeing the emptied one is a no-op.
    unsafe {
        for item in [2, 4, 6] {
            assert_eq!(
                fedrec_sdk_record(sdk, item, FEDREC_EVENT_PURCHASE, 1.0, 1_000, null_mut()),
                FEDREC_OK
            );
        }
        assert_eq!(fedrec_sdk_recommend(sdk, SHAPE.n_items, null(), &mut recs, null_mut()), FEDREC_OK);
        let items = std::slice::from_raw_parts(recs.items, recs.len);
        assert_eq!(items.len(), SHAPE.n_items - 3, "every item but the consumed ones");
        assert!(items.iter().all(|r| ![2, 4, 6].contains(&r.item)));
        assert!(items.windows(2).all(|w| w[0].score >= w[1].score));
        fedrec_recommendations_free(&mut recs);
        assert!(recs.items.is_null() && recs.len == 0);
        fedrec_recommendations_free(&mut recs);
        assert_eq!(fedrec_sdk_recommend(sdk, 0, null(), &mut recs, null_mut()), FEDREC_OK);
        assert!(recs.items.is_null() && recs.len == 0);
        fedrec_sdk_close(sdk);
    }
}

/// A coordinator that never answers: a UDP socket that only receives. A participation
/// against it blocks on the network until cancelled.
#[test]
fn a_participation_is_cancelled_from_another_thread_and_others_keep_working() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let black_hole = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    black_hole.set_read_timeout(Some(Duration::from_secs(60))).expect("a read timeout");
    let address = CString::new(black_hole.local_addr().expect("bound").to_string()).expect("no NUL");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let cert = cert.cert.der().to_vec();
    let token = [1u8; 16];
    let coordinator = FedrecCoordinator {
        address: address.as_ptr(),
        server_name: c"localhost".as_ptr(),
        cert_der: cert.as_ptr(),
        cert_der_len: cert.len(),
        token: token.as_ptr(),
        token_len: token.len(),
        n_items: SHAPE.n_items as u32,
        dim: SHAPE.dim as u32,
        n_segments: SHAPE.n_segments as u32,
        timeout_ms: 60_000,
    };
    let options = FedrecOpenOptions { coordinator: &coordinator, ..fedrec_open_options_default() };
    let sdk = open(dir.path(), &options);
    let mut cancel = null_mut();
    // SAFETY: live handle and token; valid pointers.
    unsafe {
        assert_eq!(fedrec_sdk_set_consent(sdk, true, true, null_mut()), FEDREC_OK);
        assert_eq!(fedrec_cancel_new(&mut cancel, null_mut()), FEDREC_OK);
    }
    // SAFETY: both stay live until freed below, after the scope's threads have ended.
    let (shared, token): (&FedrecSdk, &FedrecCancel) = unsafe { (&*sdk, &*cancel) };
    let popts = FedrecParticipateOptions {
        time_budget_ms: 60_000,
        max_attempts: 1,
        ..fedrec_participate_options_default()
    };
    std::thread::scope(|scope| {
        let running = scope.spawn(move || {
            let mut report = std::mem::MaybeUninit::<FedrecParticipation>::uninit();
            let mut err = null_mut();
            // SAFETY: live handle and token, valid pointers.
            let status =
                unsafe { fedrec_sdk_participate(shared, &popts, token, report.as_mut_ptr(), &mut err) };
            (status, if err.is_null() { String::new() } else { take_message(err) })
        });
        // The participation is under way once its first packet arrives.
        let mut buf = [0u8; 2048];
        black_hole.recv_from(&mut buf).expect("the device sends its first packet");
        let mut report = std::mem::MaybeUninit::<FedrecParticipation>::uninit();
        // SAFETY: live handle and token, valid pointers.
        unsafe {
            assert_eq!(
                fedrec_sdk_participate(shared, &popts, null(), report.as_mut_ptr(), null_mut()),
                FEDREC_ERR_BUSY
            );
            assert_eq!(fedrec_sdk_record(shared, 3, FEDREC_EVENT_VIEW, 1.0, 1_000, null_mut()), FEDREC_OK);
            assert_eq!(fedrec_cancel_cancel(token, null_mut()), FEDREC_OK);
        }
        let (status, message) = running.join().expect("the participating thread ends");
        assert_eq!(status, FEDREC_ERR_CANCELLED, "{message}");
    });
    // SAFETY: nothing uses them any more; each is freed once.
    unsafe {
        fedrec_cancel_free(cancel);
        fedrec_sdk_close(sdk);
    }
}

#[test]
fn forget_erases_the_store_and_closes_the_handle() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = open_with_model(dir.path());
    let mut err = null_mut();
    // SAFETY: a live handle until the close.
    unsafe {
        assert_eq!(fedrec_sdk_record(sdk, 1, FEDREC_EVENT_VIEW, 1.0, 1_000, null_mut()), FEDREC_OK);
        assert!(std::fs::read_dir(dir.path()).expect("readable").count() > 0);
        assert_eq!(fedrec_sdk_forget(sdk, null_mut()), FEDREC_OK);
        assert_eq!(std::fs::read_dir(dir.path()).expect("readable").count(), 0, "no file is left");
        assert_eq!(fedrec_sdk_forget(sdk, &mut err), FEDREC_ERR_CLOSED);
        take_message(err);
        fedrec_sdk_close(sdk);
    }
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { fedrec_sdk_erase(c_path(dir.path()).as_ptr(), null_mut()) }, FEDREC_OK);
}

#[test]
fn the_version_is_the_crate_version() {
    // SAFETY: a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(fedrec_version()) };
    assert_eq!(version.to_str(), Ok(env!("CARGO_PKG_VERSION")));
}

/// A non-NULL pointer a C caller might leave in an uninitialised out-parameter: freeing it
/// would crash, so a failed call must overwrite it.
fn garbage<T>() -> *mut T {
    std::ptr::without_provenance_mut(0xDEAD_BEE8)
}

#[test]
fn failed_calls_leave_every_out_parameter_empty_and_safe_to_free() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut err = null_mut();
    /// Checks the status of a failed call and frees its error.
    fn expect_failure(status: i32, code: i32, err: &mut *mut FedrecError) {
        assert_eq!(status, code);
        take_message(std::mem::replace(err, null_mut()));
    }
    let path = c_path(dir.path());
    let mut handle = garbage();
    // SAFETY: valid pointers; the key is too short on purpose.
    expect_failure(
        unsafe { fedrec_sdk_open(path.as_ptr(), KEY.as_ptr(), 31, null(), &mut handle, &mut err) },
        FEDREC_ERR_INVALID_ARGUMENT,
        &mut err,
    );
    assert!(handle.is_null());
    // SAFETY: closing the emptied handle is a no-op.
    unsafe { fedrec_sdk_close(handle) };

    // Both consents, no model, no coordinator, no ruleset: every call below fails.
    let sdk = open(dir.path(), null());
    let mut recs = FedrecRecommendations { items: garbage(), len: 7 };
    let (mut json, mut variant) = (garbage(), garbage());
    let (mut found, mut id, mut distance) = (true, 99u32, 9.5f32);
    let mut updated = true;
    let mut report = FedrecParticipation {
        outcome: FedrecRoundOutcome::Completed,
        selected: true,
        completed: true,
        has_round: true,
        round: 42,
        has_model_version: true,
        model_version: 42,
        retry_after_ms: 1_000,
        refusal: FedrecRefusal::NotSampled,
    };
    let ctx = FedrecContext { hour: 12, minute: 0, weekday: 0, location: null(), device_type: null() };
    // SAFETY: a live handle and valid out-pointers holding garbage, as C leaves them.
    unsafe {
        assert_eq!(fedrec_sdk_set_consent(sdk, true, true, null_mut()), FEDREC_OK);
        expect_failure(
            fedrec_sdk_recommend(sdk, 5, null(), &mut recs, &mut err),
            FEDREC_ERR_NO_MODEL,
            &mut err,
        );
        assert!(recs.items.is_null() && recs.len == 0);
        expect_failure(fedrec_sdk_explain(sdk, 1, &mut json, &mut err), FEDREC_ERR_NO_MODEL, &mut err);
        assert!(json.is_null());
        expect_failure(
            fedrec_sdk_choose_variant(sdk, c"home".as_ptr(), &ctx, &mut variant, &mut err),
            FEDREC_ERR_NOT_CONFIGURED,
            &mut err,
        );
        assert!(variant.is_null());
        expect_failure(
            fedrec_sdk_segment(sdk, &mut found, &mut id, &mut distance, &mut err),
            FEDREC_ERR_NO_MODEL,
            &mut err,
        );
        assert!(!found && id == 0 && distance == 0.0);
        expect_failure(
            fedrec_sdk_fetch_ruleset(sdk, &mut updated, &mut err),
            FEDREC_ERR_NOT_CONFIGURED,
            &mut err,
        );
        assert!(!updated);
        expect_failure(
            fedrec_sdk_participate(sdk, null(), null(), &mut report, &mut err),
            FEDREC_ERR_NOT_CONFIGURED,
            &mut err,
        );
        assert_eq!(report.outcome, FedrecRoundOutcome::Failed);
        assert!(!report.selected && !report.completed && !report.has_round && !report.has_model_version);
        assert_eq!((report.round, report.model_version, report.retry_after_ms), (0, 0, -1));
        assert_eq!(report.refusal, FedrecRefusal::None);
        // One NULL among several out-parameters: the others are cleared all the same.
        (found, distance) = (true, 9.5);
        expect_failure(
            fedrec_sdk_segment(sdk, &mut found, null_mut(), &mut distance, &mut err),
            FEDREC_ERR_NULL_POINTER,
            &mut err,
        );
        assert!(!found && distance == 0.0);

        // A closed handle fails the rest.
        assert_eq!(fedrec_sdk_forget(sdk, null_mut()), FEDREC_OK);
        let (mut personalization, mut training) = (true, true);
        expect_failure(
            fedrec_sdk_consent(sdk, &mut personalization, &mut training, &mut err),
            FEDREC_ERR_CLOSED,
            &mut err,
        );
        assert!(!personalization && !training);
        let (mut has_model, mut version) = (true, 42u64);
        expect_failure(
            fedrec_sdk_model_version(sdk, &mut has_model, &mut version, &mut err),
            FEDREC_ERR_CLOSED,
            &mut err,
        );
        assert!(!has_model && version == 0);
        json = garbage();
        expect_failure(fedrec_sdk_export(sdk, &mut json, &mut err), FEDREC_ERR_CLOSED, &mut err);
        assert!(json.is_null());

        // Freeing the emptied out-parameters, as C does whatever the status, does nothing.
        fedrec_recommendations_free(&mut recs);
        assert!(recs.items.is_null() && recs.len == 0);
        fedrec_string_free(json);
        fedrec_string_free(variant);
        fedrec_sdk_close(sdk);
    }
}

#[test]
fn functions_without_a_status_swallow_panics() {
    assert_eq!(guard(7, || panic!("a bug inside a free")), 7);
    guard((), || panic!("a bug inside a free"));
    // The guard is transparent when nothing panics.
    assert_eq!(guard(7, || 8), 8);
    // The exported functions without a status answer normally.
    let defaults = (fedrec_recommend_options_default(), fedrec_participate_options_default());
    assert!(defaults.0.exclude_consumed && defaults.1.max_attempts == 5);
    assert!(!fedrec_version().is_null());
}
