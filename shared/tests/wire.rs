//! The wire format: round trips, known-answer frames, size limits, decoders that never panic, conversions that refuse what a peer must not send, and a real round carried over the wire.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedrec_shared::danger::seeded_rng;
use fedrec_shared::error::{Rejection, UpdateError};
use fedrec_shared::round::secure::{RevealedShare, SEALED_PAIR_BYTES};
use fedrec_shared::round::{
    Aggregation, ClientMessage, ClientOutcome, ClientRound, Coordinator, CoordinatorConfig, CoordinatorEvent,
    Instant, Mechanism, Selection, ServerMessage, Task, TaskPrivacy, TaskSelection,
};
use fedrec_shared::round::{
    EncryptedShare, MaskedInputRequest, NeighbourKeys, SecAggSetup, ShareKeysRequest, UnmaskRequest,
};
use fedrec_shared::server::{CentroidPolicy, ServerOptimizer};
use fedrec_shared::train::{local_update, reconstruct};
use fedrec_shared::update::{ClippedUpdate, UpdateVector};
use fedrec_shared::wire::{
    self, AdvertiseKeys, CHECK_IN_LIMIT, CheckIn, EncryptedShares, ErrorCode, Inbound, LEN_PREFIX, Limits,
    MAX_ERROR_MESSAGE_LEN, MAX_NEIGHBOURS, MAX_SDK_VERSION_LEN, MAX_TOKEN_LEN, MaskedInput, Message,
    PROTOCOL_VERSION, RESPONSE_LIMIT, Request, Response, SEALED_PAIR_LEN, SHARE_LEN, UnmaskShares, Upload,
    WireError, WireModel, WireNeighbour, WireObjective, WireRevealedShare, WireSealedPair, WireShareKeys,
    WireTask, WireTrainParams,
};
use fedrec_shared::{GlobalModel, ModelInit, ModelShape, Objective, Rating, RoundModel, TrainParams};
use proptest::prelude::*;

const SHAPE: ModelShape = ModelShape { n_items: 6, dim: 2, n_segments: 2 };

/// The protocol version as the one varint byte that starts every payload.
const V: u8 = 3;

const EXPLICIT: TrainParams = TrainParams {
    objective: Objective::Explicit,
    l2_user: 0.5,
    l2_user_bias: 0.1,
    l2_item: 0.01,
    l2_item_bias: 0.01,
    user_support_exponent: 0.5,
};

fn model(shape: ModelShape, seed: u64) -> GlobalModel {
    let init = ModelInit { factor_std: 0.1, global_mean: 3.0, centroid_scale: 1e-3 };
    GlobalModel::init(shape, init, &mut seeded_rng(seed)).expect("valid shape")
}

fn round_model(version: u64) -> Arc<RoundModel> {
    Arc::new(RoundModel::new(version, model(SHAPE, 1)))
}

fn limits() -> Limits {
    Limits::for_shape(&SHAPE)
}

/// Room for the arbitrary messages of the property tests.
fn roomy() -> Limits {
    Limits::for_shape(&ModelShape { n_items: 64, dim: 4, n_segments: 4 })
}

/// Encodes, checks the prefix, and returns the payload.
fn payload<M: Message>(msg: &M) -> Vec<u8> {
    let frame = wire::encode(msg).expect("encodable");
    let prefix: [u8; LEN_PREFIX] = frame[..LEN_PREFIX].try_into().expect("4 bytes");
    let len = wire::frame_len(prefix, usize::MAX).expect("no limit");
    assert_eq!(len, frame.len() - LEN_PREFIX, "the prefix is the payload length");
    frame[LEN_PREFIX..].to_vec()
}

/// A device's clipped update through the real learning step: explicit feedback, so only the
/// rated rows are stored.
fn explicit_update(m: &RoundModel, ratings: &[Rating], clip_norm: f32) -> ClippedUpdate {
    let user = reconstruct(m, ratings, &EXPLICIT).expect("solvable");
    let v = local_update(m, ratings, &user, &EXPLICIT);
    assert!(v.rows().is_some(), "explicit updates store only the rated rows");
    ClippedUpdate::clip(v, clip_norm).expect("finite")
}

fn check_in(cached: Option<u64>) -> CheckIn {
    CheckIn {
        token: b"enrollment-token".to_vec(),
        sdk_version: "fedrec-sdk 0.1.0".into(),
        capabilities: 0,
        cached_model_version: cached,
    }
}

fn train_params() -> WireTrainParams {
    WireTrainParams::from(EXPLICIT)
}

// ---------------------------------------------------------------------------------------
// Round trips

#[test]
fn every_message_round_trips() {
    let m = round_model(4);
    let update = explicit_update(&m, &[Rating { item: 1, value: 4.0 }, Rating { item: 4, value: 2.0 }], 1.0);
    let requests = [
        Request::CheckIn(check_in(None)),
        Request::CheckIn(check_in(Some(u64::MAX))),
        Request::Upload(Upload::new(3, &update, Some(false), [7; 16])),
        Request::Upload(Upload::new(u64::MAX, &update, None, [0; 16])),
    ];
    for r in &requests {
        assert_eq!(&wire::decode_request(&payload(r), &limits()).expect("decodes"), r);
    }
    let task = Task {
        round: 9,
        train: TrainParams { objective: Objective::Implicit { alpha: 2.5 }, ..EXPLICIT },
        clip_norm: 0.75,
        report_clip_bit: true,
        report_window: Duration::from_millis(90_000),
        privacy: TaskPrivacy::undeclared(0.75),
    };
    let mut responses = vec![
        Response::Task(WireTask::new(&task, &m, None)),
        Response::Task(WireTask::new(&task, &m, Some(4))),
        Response::NotSelected { round: 0, retry_after_ms: 60_000 },
        Response::Ack { round: 1 << 40 },
        Response::Aborted { round: 3 },
        Response::finished(&m, None),
        Response::finished(&m, Some(m.version)),
    ];
    responses.extend(ErrorCode::ALL.iter().map(|&c| Response::error(c, c.label())));
    for r in &responses {
        assert_eq!(&wire::decode_response(&payload(r), &limits()).expect("decodes"), r);
    }
}

#[test]
fn server_messages_convert_both_ways() {
    let m = round_model(4);
    let task = Task {
        round: 9,
        train: EXPLICIT,
        clip_norm: 0.75,
        report_clip_bit: false,
        report_window: Duration::from_secs(90),
        privacy: TaskPrivacy::undeclared(0.75),
    };
    let selected = ServerMessage::Selected { task: task.clone(), model: Arc::clone(&m) };
    let retry = Duration::from_secs(30);

    // A device without the model gets it, and rebuilds the same model.
    let fresh = Response::from_server_message(&selected, None, retry);
    let Response::Task(t) = &fresh else { panic!("a task") };
    assert_eq!(t.model_version, 4);
    assert!(t.model.is_some());
    let decoded = wire::decode_response(&payload(&fresh), &limits()).expect("decodes");
    match decoded.into_inbound(None).expect("valid") {
        Inbound::Message(ServerMessage::Selected { task: got, model: got_model }) => {
            assert_eq!(got, task);
            assert_eq!(got_model.version, 4);
            assert_eq!(got_model.model, m.model);
        }
        other => panic!("expected a task, got {other:?}"),
    }

    // A device holding version 4 gets no model and reuses its own copy.
    let cached = Response::from_server_message(&selected, Some(4), retry);
    let Response::Task(t) = &cached else { panic!("a task") };
    assert!(t.model.is_none());
    let decoded = wire::decode_response(&payload(&cached), &limits()).expect("decodes");
    match decoded.into_inbound(Some(&m)).expect("valid") {
        Inbound::Message(ServerMessage::Selected { model: got_model, .. }) => {
            assert!(Arc::ptr_eq(&got_model, &m), "the cached model is reused, not copied");
        }
        other => panic!("expected a task, got {other:?}"),
    }
    // A stale cache still gets the model.
    let Response::Task(t) = Response::from_server_message(&selected, Some(3), retry) else { panic!() };
    assert!(t.model.is_some());

    let simple = [
        (ServerMessage::NotSelected { round: 2 }, Response::NotSelected { round: 2, retry_after_ms: 30_000 }),
        (ServerMessage::Ack { round: 2 }, Response::Ack { round: 2 }),
        (ServerMessage::Aborted { round: 2 }, Response::Aborted { round: 2 }),
    ];
    for (msg, want) in simple {
        let r = Response::from_server_message(&msg, None, retry);
        assert_eq!(r, want);
        match r.into_inbound(None).expect("valid") {
            Inbound::Message(back) => assert_eq!(format!("{back:?}"), format!("{msg:?}")),
            other => panic!("expected {msg:?}, got {other:?}"),
        }
    }
    assert_eq!(
        Response::NotSelected { round: 2, retry_after_ms: 1500 }.retry_after(),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(Response::Ack { round: 2 }.retry_after(), None);

    // A rejection becomes an error code; the norm (a statistic of the device's data) is not echoed.
    let norm = Rejection::InvalidUpdate(UpdateError::NormTooLarge { norm: 12.345, clip_norm: 1.0 });
    let r = Response::from_server_message(&ServerMessage::Rejected { round: 2, reason: norm }, None, retry);
    let Response::Error { code, message, retry_after_ms: None } = &r else { panic!("an error") };
    assert_eq!(*code, ErrorCode::NormTooLarge);
    assert!(!message.contains("12.3"), "{message}");
    match r.into_inbound(None).expect("valid") {
        Inbound::Error { code, .. } => assert_eq!(code, ErrorCode::NormTooLarge),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn client_messages_convert_to_requests() {
    let m = round_model(1);
    let update = explicit_update(&m, &[Rating { item: 0, value: 5.0 }], 1.0);
    let ci = check_in(Some(1));
    assert_eq!(
        Request::from_client_message(&ClientMessage::CheckIn, &ci, [0; 16]),
        Request::CheckIn(ci.clone())
    );
    let msg = ClientMessage::Upload { round: 5, update: update.clone(), within_bound: Some(true) };
    let Request::Upload(u) = Request::from_client_message(&msg, &ci, [9; 16]) else { panic!("an upload") };
    assert_eq!((u.round, u.within_bound, u.nonce), (5, Some(true), [9; 16]));
    assert_eq!(u.update, update.vector().to_dense());
    let layout = SHAPE.layout();
    match u.into_client_message(&layout, 1.0).expect("an honest upload verifies") {
        ClientMessage::Upload { round, update: got, within_bound } => {
            assert_eq!((round, within_bound), (5, Some(true)));
            assert_eq!(got.vector().to_dense(), update.vector().to_dense());
        }
        other => panic!("an upload, got {other:?}"),
    }
}

#[test]
fn train_params_and_objectives_convert_both_ways() {
    for objective in [Objective::Explicit, Objective::Implicit { alpha: 40.0 }] {
        let p = TrainParams { objective, ..EXPLICIT };
        assert_eq!(TrainParams::from(WireTrainParams::from(p)), p);
    }
    assert_eq!(
        WireObjective::from(Objective::Implicit { alpha: 1.0 }),
        WireObjective::Implicit { alpha: 1.0 }
    );
}

// ---------------------------------------------------------------------------------------
// Dense uploads

#[test]
fn a_sparse_update_encodes_as_its_dense_form() {
    let m = round_model(1);
    // A large clip norm leaves both vectors unscaled, so they are the same vector.
    let sparse = explicit_update(&m, &[Rating { item: 2, value: 1.0 }, Rating { item: 5, value: 4.5 }], 1e6);
    assert!(!sparse.was_clipped());
    let dense_vec = UpdateVector::from_dense(SHAPE.layout(), &sparse.vector().to_dense()).expect("length");
    assert!(dense_vec.rows().is_none());
    let dense = ClippedUpdate::clip(dense_vec, 1e6).expect("finite");
    let a = wire::encode(&Request::from(Upload::new(1, &sparse, None, [1; 16]))).expect("encodes");
    let b = wire::encode(&Request::from(Upload::new(1, &dense, None, [1; 16]))).expect("encodes");
    assert_eq!(a, b);
    // Every value of the layout is on the wire, zeros included.
    let Request::Upload(u) = wire::decode_request(&a[LEN_PREFIX..], &limits()).expect("decodes") else {
        panic!("an upload")
    };
    assert_eq!(u.update.len(), SHAPE.layout().len());
    assert!(
        u.update.iter().filter(|&&x| x == 0.0).count() >= 4 * SHAPE.dim,
        "unrated rows are sent as zeros"
    );
}

#[test]
fn upload_length_depends_only_on_the_shape_and_the_round() {
    let m = round_model(1);
    let light = explicit_update(&m, &[Rating { item: 0, value: 1.0 }], 1.0);
    let heavy_ratings: Vec<Rating> =
        (0..SHAPE.n_items as u32).map(|i| Rating { item: i, value: 5.0 }).collect();
    let heavy = explicit_update(&m, &heavy_ratings, 1.0);
    let other = explicit_update(&m, &[Rating { item: 3, value: 3.7 }, Rating { item: 5, value: 1.0 }], 1e-3);
    let zero = ClippedUpdate::clip(UpdateVector::zeros_rows(SHAPE.layout(), vec![]).expect("no rows"), 1.0)
        .expect("finite");
    let n = SHAPE.layout().len();
    for round in [0u64, 1, 127, 128, 1 << 35, u64::MAX] {
        for bit in [None, Some(true)] {
            let lens: Vec<usize> = [&light, &heavy, &other, &zero]
                .iter()
                .map(|u| {
                    wire::encode(&Request::from(Upload::new(round, u, bit, [0; 16]))).expect("encodes").len()
                })
                .collect();
            assert!(lens.iter().all(|&l| l == lens[0]), "round {round}: {lens:?}");
            // prefix, version, variant, round varint, array length varint (4n < 128 here),
            // the values, the clip bit option, the nonce.
            let varint = |x: u64| (64 - x.leading_zeros() as usize).div_ceil(7).max(1);
            let expected =
                LEN_PREFIX + 1 + 1 + varint(round) + 1 + 4 * n + 1 + usize::from(bit.is_some()) + 16;
            assert_eq!(lens[0], expected, "round {round}, bit {bit:?}");
            assert!(lens[0] - LEN_PREFIX <= limits().upload());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Known answers

/// The messages the hand-written frames of `tests/data/wire_known_answers.txt` encode.
fn known_answer_messages() -> Vec<(&'static str, Result<Request, Response>)> {
    let tiny = ModelShape { n_items: 1, dim: 1, n_segments: 1 };
    assert_eq!(tiny.layout().len(), 5);
    let train = WireTrainParams {
        objective: WireObjective::Implicit { alpha: 1.0 },
        l2_user: 0.5,
        l2_user_bias: 0.0,
        l2_item: 0.0,
        l2_item_bias: 0.0,
        user_support_exponent: 0.75,
    };
    let task = WireTask {
        round: 2,
        model_version: 3,
        train,
        clip_norm: 1.0,
        report_clip_bit: true,
        report_window_ms: 1500,
        privacy: (&TaskPrivacy {
            mechanism: Mechanism::CentralGaussian,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            selection: TaskSelection::Poisson { q: 0.5 },
            min_reports: 100,
            population: Some(1000),
            aggregation: Aggregation::Plain,
        })
            .into(),
        model: Some(WireModel {
            version: 3,
            n_items: 1,
            dim: 1,
            n_segments: 1,
            item_factors: vec![0.5],
            item_bias: vec![0.0],
            global_mean: 3.5,
            centroids: vec![-1.0],
        }),
    };
    let task_cached = WireTask {
        train: WireTrainParams { objective: WireObjective::Explicit, ..train },
        privacy: (&TaskPrivacy {
            mechanism: Mechanism::None,
            noise_multiplier: 0.0,
            clip_norm: 1.0,
            selection: TaskSelection::FirstCome { cohort: 300 },
            min_reports: 1,
            population: None,
            aggregation: Aggregation::Secure,
        })
            .into(),
        model: None,
        ..task.clone()
    };
    let nonce: [u8; 16] = std::array::from_fn(|i| i as u8);
    vec![
        (
            "check_in",
            Ok(Request::CheckIn(CheckIn {
                token: b"tok".to_vec(),
                sdk_version: "1.0".into(),
                capabilities: 0,
                cached_model_version: Some(300),
            })),
        ),
        (
            "check_in_fresh",
            Ok(Request::CheckIn(CheckIn {
                token: vec![0xff, 0x00],
                sdk_version: String::new(),
                capabilities: 0x8000_0001,
                cached_model_version: None,
            })),
        ),
        (
            "upload",
            Ok(Request::Upload(Upload {
                round: 7,
                update: vec![1.0, -2.0, 0.5, 0.0, 0.25],
                within_bound: Some(true),
                nonce,
            })),
        ),
        (
            "upload_no_bit",
            Ok(Request::Upload(Upload {
                round: 300,
                update: vec![0.0; 5],
                within_bound: None,
                nonce: [0xff; 16],
            })),
        ),
        ("task", Err(Response::Task(task.clone()))),
        ("task_cached", Err(Response::Task(task_cached))),
        ("not_selected", Err(Response::NotSelected { round: 1, retry_after_ms: 1000 })),
        ("ack", Err(Response::Ack { round: 5 })),
        (
            "error",
            Err(Response::Error {
                code: ErrorCode::NormTooLarge,
                message: "no".into(),
                retry_after_ms: None,
            }),
        ),
        (
            "error_retry",
            Err(Response::Error {
                code: ErrorCode::RateLimited,
                message: "later".into(),
                retry_after_ms: Some(60_000),
            }),
        ),
        ("aborted", Err(Response::Aborted { round: 128 })),
        (
            "error_busy",
            Err(Response::Error {
                code: ErrorCode::Busy,
                message: "busy".into(),
                retry_after_ms: Some(1000),
            }),
        ),
        ("finished", Err(Response::Finished { model_version: 3, model: task.model.clone() })),
        ("finished_cached", Err(Response::Finished { model_version: 3, model: None })),
        (
            "advertise_keys",
            Ok(Request::AdvertiseKeys(AdvertiseKeys {
                round: 5,
                cipher_public: [0x11; 32],
                mask_public: [0x22; 32],
                nonce,
            })),
        ),
        (
            "encrypted_shares",
            Ok(Request::EncryptedShares(EncryptedShares {
                round: 1,
                shares: vec![WireSealedPair { peer: 300, ciphertext: vec![0xcd; SEALED_PAIR_LEN] }],
                nonce: [0xff; 16],
            })),
        ),
        (
            "masked_input",
            Ok(Request::MaskedInput(MaskedInput { round: 7, words: vec![0, 1, u64::from(u32::MAX)], nonce })),
        ),
        (
            "masked_input_wide",
            Ok(Request::MaskedInput(MaskedInput { round: 7, words: vec![1, 1 << 32], nonce: [0; 16] })),
        ),
        (
            "unmask_shares",
            Ok(Request::UnmaskShares(UnmaskShares {
                round: 9,
                mask_key_shares: vec![WireRevealedShare {
                    owner: 4,
                    share: std::array::from_fn(|i| i as u8),
                }],
                self_mask_shares: vec![WireRevealedShare { owner: 2, share: [0xee; SHARE_LEN] }],
                nonce: [0; 16],
            })),
        ),
        (
            "share_keys",
            Err(Response::ShareKeys(WireShareKeys {
                round: 3,
                seed: [0x5e; 32],
                n: 2,
                k: 1,
                t: 2,
                bits: 20,
                index: 1,
                neighbours: vec![WireNeighbour {
                    index: 0,
                    cipher_public: [0x0c; 32],
                    mask_public: [0x05; 32],
                }],
            })),
        ),
        (
            "masked_input_request",
            Err(Response::MaskedInputRequest {
                round: 3,
                shares: vec![WireSealedPair { peer: 0, ciphertext: vec![0x77; SEALED_PAIR_LEN] }],
            }),
        ),
        ("unmask", Err(Response::Unmask { round: 300, dropped: vec![5], survivors: vec![0, 200] })),
    ]
}

fn known_answer_frames() -> HashMap<String, Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/wire_known_answers.txt");
    let text = std::fs::read_to_string(&path).expect("known-answer file");
    let mut out = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut words = line.split_whitespace();
        let name = words.next().expect("a name").to_owned();
        let hex: String = words.collect();
        let bytes =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
        assert!(out.insert(name.clone(), bytes).is_none(), "duplicate {name}");
    }
    out
}

#[test]
fn known_answer_frames_match() {
    let frames = known_answer_frames();
    let tiny = Limits::for_shape(&ModelShape { n_items: 1, dim: 1, n_segments: 1 });
    let messages = known_answer_messages();
    assert_eq!(frames.len(), messages.len(), "every frame in the file is checked");
    for (name, msg) in messages {
        let want = frames.get(name).unwrap_or_else(|| panic!("{name} is in the file"));
        let got = match &msg {
            Ok(r) => wire::encode(r),
            Err(r) => wire::encode(r),
        }
        .expect("encodes");
        assert_eq!(hex(&got), hex(want), "{name}: the encoding changed");
        let body = &want[LEN_PREFIX..];
        match msg {
            Ok(r) => assert_eq!(wire::decode_request(body, &tiny).expect("decodes"), r, "{name}"),
            Err(r) => assert_eq!(wire::decode_response(body, &tiny).expect("decodes"), r, "{name}"),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn protocol_constants() {
    assert_eq!(PROTOCOL_VERSION, 3);
    assert_eq!(u16::from(V), PROTOCOL_VERSION);
    assert_eq!(wire::ALPN, b"fedrec/3");
    assert_eq!((CHECK_IN_LIMIT, RESPONSE_LIMIT), (4096, 1024));
    let l = Limits::for_shape(&ModelShape { n_items: 1000, dim: 16, n_segments: 8 });
    let layout_len = 1000 * 16 + 1000 + 1 + 8 * 16 + 8;
    assert_eq!(l.upload(), 4 * layout_len + wire::UPLOAD_OVERHEAD);
    assert_eq!(l.task(), 4 * (1000 * 16 + 1000 + 1 + 8 * 16) + wire::TASK_OVERHEAD);
    // v2: the widest masked input (8 bytes a word, the layout plus the clip bit) is the
    // largest request of a real model; the largest response is the task or, for a model
    // under ~110 KB, the sealed pairs of MAX_NEIGHBOURS neighbours.
    assert_eq!(l.masked_input(), 8 * (layout_len + 1) + wire::SECURE_OVERHEAD);
    assert_eq!(l.max_request(), l.masked_input());
    assert_eq!(l.max_response(), l.task().max(wire::SEALED_PAIRS_LIMIT));
    assert_eq!(wire::SEALED_PAIRS_LIMIT, 112_704);
    assert_eq!(Limits::for_shape(&ML_100K).max_response(), Limits::for_shape(&ML_100K).task());
    // Absurd shapes saturate instead of overflowing.
    let huge = Limits::for_shape(&ModelShape { n_items: usize::MAX, dim: 1024, n_segments: 1 });
    assert_eq!(huge.upload(), usize::MAX);
}

// ---------------------------------------------------------------------------------------
// Limits and hostile bytes

#[test]
fn frame_len_refuses_oversize_frames() {
    assert_eq!(wire::frame_len(100u32.to_le_bytes(), 100), Ok(100));
    assert_eq!(wire::frame_len(101u32.to_le_bytes(), 100), Err(WireError::TooLarge { len: 101, limit: 100 }));
    assert!(matches!(wire::frame_len([0xff; 4], limits().max_request()), Err(WireError::TooLarge { .. })));
}

#[test]
fn each_message_kind_has_its_own_limit() {
    // A check-in payload longer than its limit is refused before its body is parsed, even
    // when the frame fits the largest request (a big model's upload).
    let big = Limits::for_shape(&ModelShape { n_items: 10_000, dim: 8, n_segments: 4 });
    let mut p = vec![0u8; CHECK_IN_LIMIT + 1];
    p[0] = 3; // version
    p[1] = 0; // CheckIn
    assert_eq!(
        wire::decode_request(&p, &big),
        Err(WireError::TooLarge { len: CHECK_IN_LIMIT + 1, limit: CHECK_IN_LIMIT })
    );
    // The same for responses that are not tasks.
    let mut p = vec![0u8; RESPONSE_LIMIT + 1];
    p[0] = 3;
    p[1] = 2; // Ack
    assert_eq!(
        wire::decode_response(&p, &big),
        Err(WireError::TooLarge { len: RESPONSE_LIMIT + 1, limit: RESPONSE_LIMIT })
    );
    // An upload for a bigger model than the round's.
    let other = explicit_update(
        &RoundModel::new(0, model(ModelShape { n_items: 50, dim: 2, n_segments: 2 }, 1)),
        &[Rating { item: 0, value: 1.0 }],
        1.0,
    );
    let p = payload(&Request::from(Upload::new(0, &other, None, [0; 16])));
    assert!(matches!(wire::decode_request(&p, &limits()), Err(WireError::TooLarge { .. })));
    // A task whose model is bigger than the device accepts.
    let t = WireTask::new(
        &Task {
            round: 0,
            train: EXPLICIT,
            clip_norm: 1.0,
            report_clip_bit: false,
            report_window: Duration::ZERO,
            privacy: TaskPrivacy::undeclared(1.0),
        },
        &RoundModel::new(0, model(ModelShape { n_items: 50, dim: 2, n_segments: 2 }, 1)),
        None,
    );
    let p = payload(&Response::Task(t));
    assert!(matches!(wire::decode_response(&p, &limits()), Err(WireError::TooLarge { .. })));
}

#[test]
fn the_largest_messages_fit_their_limits() {
    // Every varint at its longest, every bounded field full.
    let ci = CheckIn {
        token: vec![0xff; MAX_TOKEN_LEN],
        sdk_version: "v".repeat(MAX_SDK_VERSION_LEN),
        capabilities: u32::MAX,
        cached_model_version: Some(u64::MAX),
    };
    assert!(payload(&Request::CheckIn(ci)).len() <= CHECK_IN_LIMIT);
    let err = Response::Error {
        code: ErrorCode::MissingClipBit,
        message: "é".repeat(MAX_ERROR_MESSAGE_LEN / 2),
        retry_after_ms: Some(u64::MAX),
    };
    assert!(payload(&err).len() <= RESPONSE_LIMIT);
    for r in [
        Response::NotSelected { round: u64::MAX, retry_after_ms: u64::MAX },
        Response::Ack { round: u64::MAX },
        Response::Aborted { round: u64::MAX },
    ] {
        assert!(payload(&r).len() <= RESPONSE_LIMIT);
    }
    for shape in [SHAPE, ModelShape { n_items: 3000, dim: 64, n_segments: 16 }] {
        let l = Limits::for_shape(&shape);
        let n = shape.layout().len();
        let up =
            Upload { round: u64::MAX, update: vec![1.0; n], within_bound: Some(true), nonce: [0xff; 16] };
        let p = payload(&Request::Upload(up));
        assert!(p.len() <= l.upload(), "{} vs {}", p.len(), l.upload());
        assert_eq!(wire::decode_request(&p, &l).map(|_| ()), Ok(()));
        let mut wm = WireModel::from_global(u64::MAX, &model(shape, 2));
        wm.n_items = u64::MAX; // the longest varints; the decoder does not check shapes
        wm.dim = u64::MAX;
        wm.n_segments = u64::MAX;
        let t = WireTask {
            round: u64::MAX,
            model_version: u64::MAX,
            train: WireTrainParams { objective: WireObjective::Implicit { alpha: 1.0 }, ..train_params() },
            clip_norm: 1.0,
            report_clip_bit: true,
            report_window_ms: u64::MAX,
            // The longest privacy block: unknown codes, every varint at its longest.
            privacy: (&TaskPrivacy {
                mechanism: Mechanism::Unknown(u16::MAX),
                noise_multiplier: f64::MAX,
                clip_norm: 1.0,
                selection: TaskSelection::FirstCome { cohort: u64::MAX },
                min_reports: u64::MAX,
                population: Some(u64::MAX),
                aggregation: Aggregation::Unknown(u16::MAX),
            })
                .into(),
            model: Some(wm),
        };
        let p = payload(&Response::Task(t));
        assert!(p.len() <= l.task(), "{} vs {}", p.len(), l.task());
        assert_eq!(wire::decode_response(&p, &l).map(|_| ()), Ok(()));
    }
}

/// A varint, as postcard writes it.
fn varint(mut x: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn a_tiny_frame_claiming_a_huge_length_allocates_nothing_and_fails() {
    // Were any of these lengths used to pre-allocate, the test would abort (capacity overflow
    // or out of memory) instead of returning an error.
    let l = limits();
    for claim in [1u64 << 20, 1 << 40, 1 << 62, u64::MAX >> 1, u64::MAX] {
        let mut token = vec![V, 0];
        token.extend(varint(claim));
        assert!(matches!(wire::decode_request(&token, &l), Err(WireError::Malformed(_))), "token {claim}");

        let mut sdk = vec![V, 0, 0];
        sdk.extend(varint(claim));
        assert!(
            matches!(wire::decode_request(&sdk, &l), Err(WireError::Malformed(_))),
            "sdk_version {claim}"
        );

        let mut update = vec![V, 1, 0];
        update.extend(varint(claim));
        update.extend([0; 8]);
        assert!(matches!(wire::decode_request(&update, &l), Err(WireError::Malformed(_))), "update {claim}");

        // A task's model factors.
        let mut factors = vec![V, 0, 0, 0, 0];
        factors.extend([0; 16]);
        factors.extend([0; 4]);
        factors.extend([0, 0, 1, 0, 1, 1, 1]);
        factors.extend(varint(claim));
        assert!(
            matches!(wire::decode_response(&factors, &l), Err(WireError::Malformed(_))),
            "factors {claim}"
        );

        let mut message = vec![V, 3, 1];
        message.extend(varint(claim));
        assert!(
            matches!(wire::decode_response(&message, &l), Err(WireError::Malformed(_))),
            "message {claim}"
        );
    }
    // A length that is there but not a whole number of floats.
    let mut p = vec![V, 1, 0, 3, 0, 0, 0, 0];
    p.extend([0; 16]);
    assert!(matches!(wire::decode_request(&p, &l), Err(WireError::Malformed(_))));
}

#[test]
fn the_version_is_read_first() {
    let l = limits();
    let v3 = payload(&Request::CheckIn(check_in(None)));
    for version in [0u16, 1, 2, 4, 300, u16::MAX] {
        // Another version's body need not parse as v3.
        let mut p = varint(u64::from(version));
        p.extend([0xff; 40]);
        let want = WireError::VersionMismatch { got: version, expected: 3 };
        assert_eq!(wire::decode_request(&p, &l), Err(want.clone()));
        assert_eq!(wire::decode_response(&p, &l), Err(want.clone()));
        // A v3 body under another version number is refused just the same.
        let mut p = varint(u64::from(version));
        p.extend(&v3[1..]);
        assert_eq!(wire::decode_request(&p, &l), Err(want));
    }
    assert_eq!(WireError::VersionMismatch { got: 2, expected: 3 }.code(), ErrorCode::VersionMismatch);
}

#[test]
fn malformed_payloads_are_refused() {
    let l = limits();
    let malformed = |r: Result<Request, WireError>| matches!(r, Err(WireError::Malformed(_)));
    assert!(malformed(wire::decode_request(&[], &l)));
    assert!(malformed(wire::decode_request(&[V], &l)));
    assert!(malformed(wire::decode_request(&[V, 7], &l)), "no request has variant index 7");
    assert!(matches!(wire::decode_response(&[V, 10], &l), Err(WireError::Malformed(_))), "nor response 10");
    assert!(matches!(wire::decode_response(&[V, 6], &l), Err(WireError::Malformed(_))), "a truncated one");
    let mut p = payload(&Request::CheckIn(check_in(None)));
    p.push(0);
    assert!(malformed(wire::decode_request(&p, &l)), "trailing bytes");
    // A bool that is neither 0 nor 1.
    let mut up = payload(&Request::Upload(Upload {
        round: 1,
        update: vec![0.0; SHAPE.layout().len()],
        within_bound: Some(true),
        nonce: [0; 16],
    }));
    let bit = up.len() - 17;
    up[bit] = 2;
    assert!(malformed(wire::decode_request(&up, &l)));
    // Not UTF-8.
    let mut p = vec![V, 0, 0, 2, 0xc3, 0x28, 0, 0];
    assert!(malformed(wire::decode_request(&p, &l)));
    p[4] = b'o';
    p[5] = b'k';
    assert!(wire::decode_request(&p, &l).is_ok());
}

#[test]
fn over_long_fields_are_refused_by_both_sides() {
    let l = limits();
    let long_token = CheckIn { token: vec![0; MAX_TOKEN_LEN + 1], ..check_in(None) };
    assert!(matches!(wire::encode(&Request::CheckIn(long_token.clone())), Err(WireError::Invalid(_))));
    let long_sdk = CheckIn { sdk_version: "x".repeat(MAX_SDK_VERSION_LEN + 1), ..check_in(None) };
    assert!(matches!(wire::encode(&Request::CheckIn(long_sdk)), Err(WireError::Invalid(_))));
    // Hand-built, since the encoder refuses it.
    let mut p = vec![V, 0];
    p.extend(varint(MAX_TOKEN_LEN as u64 + 1));
    p.extend(vec![0u8; MAX_TOKEN_LEN + 1]);
    p.extend([0, 0, 0]);
    assert!(matches!(wire::decode_request(&p, &l), Err(WireError::Invalid(_))));
    p.truncate(2);
    p.extend(varint(MAX_TOKEN_LEN as u64));
    p.extend(vec![0u8; MAX_TOKEN_LEN]);
    p.extend([0, 0, 0]);
    assert!(wire::decode_request(&p, &l).is_ok());

    let long = Response::Error {
        code: ErrorCode::Internal,
        message: "x".repeat(MAX_ERROR_MESSAGE_LEN + 1),
        retry_after_ms: None,
    };
    assert!(matches!(wire::encode(&long), Err(WireError::Invalid(_))));
    let mut p = vec![V, 3, 14];
    p.extend(varint(MAX_ERROR_MESSAGE_LEN as u64 + 1));
    p.extend(vec![b'x'; MAX_ERROR_MESSAGE_LEN + 1]);
    p.push(0);
    assert!(matches!(wire::decode_response(&p, &l), Err(WireError::Invalid(_))));
    // The constructor cuts at a character boundary instead.
    let Response::Error { message, .. } = Response::error(ErrorCode::Internal, &"€".repeat(100)) else {
        panic!()
    };
    assert_eq!(message.len(), 255);
    assert!(wire::encode(&Response::error(ErrorCode::Internal, &"x".repeat(1000))).is_ok());
}

// ---------------------------------------------------------------------------------------
// Conversions refuse what a peer must not send

#[test]
fn uploads_are_verified_against_the_round() {
    let layout = SHAPE.layout();
    let n = layout.len();
    let upload = |update: Vec<f32>| Upload { round: 1, update, within_bound: None, nonce: [0; 16] };
    let ok = upload(vec![0.01; n]).verify(&layout, 1.0).expect("within the bound");
    assert_eq!(ok.0, 1);

    for len in [0, n - 1, n + 1] {
        let e = upload(vec![0.0; len]).verify(&layout, 1.0).expect_err("wrong length");
        assert_eq!(e, WireError::InvalidUpdate(UpdateError::WrongLength { expected: n, got: len }));
        assert_eq!(e.code(), ErrorCode::WrongShape);
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![0.0; n];
        v[n - 1] = bad;
        let e = upload(v).verify(&layout, 1.0).expect_err("non-finite");
        assert_eq!(e, WireError::InvalidUpdate(UpdateError::NonFinite));
        assert_eq!(e.code(), ErrorCode::NonFinite);
    }
    let mut v = vec![0.0; n];
    v[0] = 1.0;
    let e = upload(v).verify(&layout, 1.0).expect_err("norm 1 is not strictly within the margin");
    assert!(matches!(e, WireError::InvalidUpdate(UpdateError::NormTooLarge { .. })), "{e:?}");
    assert_eq!(e.code(), ErrorCode::NormTooLarge);
    let e = upload(vec![1.0; n]).into_client_message(&layout, 1.0).expect_err("norm √n");
    assert_eq!(e.code(), ErrorCode::NormTooLarge);
}

#[test]
fn models_are_checked_on_arrival() {
    let good = WireModel::from_global(7, &model(SHAPE, 3));
    let (version, back) = good.clone().into_global().expect("valid");
    assert_eq!((version, &back), (7, &model(SHAPE, 3)));
    assert_eq!(RoundModel::try_from(good.clone()).expect("valid").version, 7);
    assert_eq!(GlobalModel::try_from(good.clone()).expect("valid"), back);

    let bad: Vec<(&str, WireModel)> = vec![
        ("short factors", WireModel { item_factors: good.item_factors[1..].to_vec(), ..good.clone() }),
        ("long bias", WireModel { item_bias: [good.item_bias.clone(), vec![0.0]].concat(), ..good.clone() }),
        ("short centroids", WireModel { centroids: vec![], ..good.clone() }),
        ("n_items disagrees", WireModel { n_items: 5, ..good.clone() }),
        ("dim disagrees", WireModel { dim: 3, ..good.clone() }),
        ("n_segments disagrees", WireModel { n_segments: 3, ..good.clone() }),
        ("zero dim", WireModel { dim: 0, item_factors: vec![], centroids: vec![], ..good.clone() }),
        ("zero items", WireModel { n_items: 0, item_factors: vec![], item_bias: vec![], ..good.clone() }),
        ("dim too large", WireModel { dim: 2000, ..good.clone() }),
        ("overflowing shape", WireModel { n_items: u64::MAX, dim: 1024, ..good.clone() }),
        ("nan mean", WireModel { global_mean: f32::NAN, ..good.clone() }),
        ("inf factor", {
            let mut m = good.clone();
            m.item_factors[3] = f32::INFINITY;
            m
        }),
        ("nan bias", {
            let mut m = good.clone();
            m.item_bias[0] = f32::NAN;
            m
        }),
        ("inf centroid", {
            let mut m = good.clone();
            m.centroids[1] = f32::NEG_INFINITY;
            m
        }),
    ];
    for (what, m) in bad {
        assert!(matches!(m.into_global(), Err(WireError::Invalid(_))), "{what}");
    }
}

#[test]
fn tasks_need_the_model_they_name() {
    let m = round_model(4);
    let task = Task {
        round: 1,
        train: EXPLICIT,
        clip_norm: 1.0,
        report_clip_bit: false,
        report_window: Duration::ZERO,
        privacy: TaskPrivacy::undeclared(1.0),
    };
    // The model on the wire has another version than the task names.
    let mut t = WireTask::new(&task, &m, None);
    t.model_version = 5;
    assert!(matches!(t.into_server_message(None), Err(WireError::Invalid(_))));
    // No model, and no cached copy (or the wrong one).
    let t = WireTask::new(&task, &m, Some(4));
    assert!(matches!(t.clone().into_server_message(None), Err(WireError::Invalid(_))));
    assert!(matches!(t.clone().into_server_message(Some(&round_model(3))), Err(WireError::Invalid(_))));
    assert!(t.into_server_message(Some(&m)).is_ok());
    // A model that fails its checks fails the task.
    let mut t = WireTask::new(&task, &m, None);
    if let Some(wm) = t.model.as_mut() {
        wm.item_bias.pop();
    }
    assert!(matches!(Response::Task(t).into_inbound(None), Err(WireError::Invalid(_))));
}

#[test]
fn a_task_declares_its_rounds_privacy_and_the_device_reads_it_back() {
    let m = round_model(4);
    let task = Task {
        round: 1,
        train: EXPLICIT,
        clip_norm: 2.0,
        report_clip_bit: false,
        report_window: Duration::ZERO,
        privacy: TaskPrivacy::undeclared(2.0),
    };
    // A task built without privacy parameters promises nothing.
    let plain = WireTask::new(&task, &m, None);
    assert_eq!(plain.task_privacy(), Ok(TaskPrivacy::undeclared(2.0)));
    // A noised Poisson round, as the coordinator's configuration describes it.
    let mut cfg = wire_config(Selection::Poisson { q: 0.25 }, 3);
    cfg.noise_multiplier = 1.5;
    cfg.population = Some(400);
    let declared = TaskPrivacy::from_config(&cfg, 2.0);
    assert_eq!(declared.population, Some(400));
    assert_eq!(declared.mechanism, Mechanism::CentralGaussian);
    assert_eq!(declared.selection, TaskSelection::Poisson { q: 0.25 });
    assert_eq!((declared.noise_multiplier, declared.min_reports), (1.5, 3));
    let t = WireTask::new(&task, &m, None).with_privacy(&declared);
    let back = wire::decode_response(&payload(&Response::Task(t)), &limits()).expect("decodes");
    let Response::Task(back) = back else { panic!("a task") };
    assert_eq!(back.task_privacy(), Ok(declared));
    // First-come without noise: mechanism None, σ 0, the cohort and min_reports as configured.
    let first_come = TaskPrivacy::from_config(&wire_config(Selection::FirstCome { cohort: 7 }, 1), 2.0);
    assert_eq!(first_come.mechanism, Mechanism::None);
    assert_eq!(first_come.selection, TaskSelection::FirstCome { cohort: 7 });
    assert_eq!(
        (first_come.noise_multiplier, first_come.min_reports, first_come.sampling_probability()),
        (0.0, 1, 1.0)
    );
    // Numbers no honest coordinator sends are refused as misbehaviour, not guessed at.
    for bad in [
        TaskPrivacy { noise_multiplier: f64::NAN, ..declared },
        TaskPrivacy { noise_multiplier: -1.0, ..declared },
        TaskPrivacy { selection: TaskSelection::Poisson { q: 0.0 }, ..declared },
        TaskPrivacy { selection: TaskSelection::Poisson { q: 1.5 }, ..declared },
        TaskPrivacy { selection: TaskSelection::Poisson { q: f64::NAN }, ..declared },
    ] {
        let t = WireTask::new(&task, &m, None).with_privacy(&bad);
        assert!(matches!(t.task_privacy(), Err(WireError::Invalid(_))), "{bad:?}");
    }
    // A mechanism or an aggregation mode from a later version arrives as unknown, not as an error.
    let later =
        TaskPrivacy { mechanism: Mechanism::Unknown(9), aggregation: Aggregation::Unknown(4), ..declared };
    let t = WireTask::new(&task, &m, None).with_privacy(&later);
    let back = wire::decode_response(&payload(&Response::Task(t)), &limits()).expect("decodes");
    let Response::Task(back) = back else { panic!("a task") };
    assert_eq!(back.task_privacy(), Ok(later));
}

/// A coordinator configuration without noise for the conversion tests.
fn wire_config(selection: Selection, min_reports: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        train: EXPLICIT,
        optimizer: ServerOptimizer::adam(0.1),
        selection,
        min_reports,
        population: None,
        checkin_window: Duration::from_secs(1),
        report_window: Duration::from_secs(1),
        clip_norm: 2.0,
        adaptive_clip: None,
        noise_multiplier: 0.0,
        centroids: CentroidPolicy::with_min_count(1.0),
        privacy: None,
        secure: None,
    }
}

#[test]
fn every_rejection_has_an_error_code() {
    let rejections = [
        Rejection::WrongRound { got: 1, current: 2 },
        Rejection::NotSelected,
        Rejection::Duplicate,
        Rejection::WrongPhase,
        Rejection::MissingClipBit,
        Rejection::InvalidUpdate(UpdateError::WrongLength { expected: 1, got: 2 }),
        Rejection::InvalidUpdate(UpdateError::BadRows),
        Rejection::InvalidUpdate(UpdateError::NonFinite),
        Rejection::InvalidUpdate(UpdateError::NormTooLarge { norm: 2.0, clip_norm: 1.0 }),
    ];
    for r in &rejections {
        let code = ErrorCode::from(r);
        assert_eq!(code.label(), r.label(), "{r:?}");
        if let Some(back) = code.rejection() {
            assert_eq!(&back, r);
        }
    }
    for (n, code) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(usize::from(code.as_u16()), n);
        assert_eq!(ErrorCode::from(code.as_u16()), *code);
        assert_eq!(code.to_string(), code.label());
    }
    assert_eq!(ErrorCode::from(999), ErrorCode::Unknown);
    // An unknown code from a newer peer still decodes.
    let mut p = vec![V, 3];
    p.extend(varint(999));
    p.extend([2, b'h', b'i', 0]);
    assert_eq!(
        wire::decode_response(&p, &limits()),
        Ok(Response::Error { code: ErrorCode::Unknown, message: "hi".into(), retry_after_ms: None })
    );
    assert_eq!(WireError::Malformed("x".into()).code(), ErrorCode::Malformed);
    assert_eq!(WireError::TooLarge { len: 2, limit: 1 }.code(), ErrorCode::TooLarge);
}

#[test]
fn the_token_stays_out_of_debug_output() {
    let ci = CheckIn { token: b"secret-token".to_vec(), ..check_in(None) };
    let s = format!("{ci:?} {:?}", Request::CheckIn(ci.clone()));
    assert!(!s.contains("secret") && !s.contains("115, 101"), "{s}");
    assert!(s.contains("<12 bytes>"), "{s}");
}

// ---------------------------------------------------------------------------------------
// A real round over the wire

/// The real machines on both sides, every message encoded, framed and decoded in between.
#[test]
fn a_round_runs_over_the_wire() {
    let shape = ModelShape { n_items: 12, dim: 3, n_segments: 2 };
    let cfg = CoordinatorConfig {
        train: EXPLICIT,
        optimizer: ServerOptimizer::adam(0.05),
        selection: Selection::FirstCome { cohort: 2 },
        min_reports: 2,
        population: None,
        checkin_window: Duration::from_secs(60),
        report_window: Duration::from_secs(120),
        clip_norm: 10.0,
        noise_multiplier: 0.0,
        adaptive_clip: None,
        privacy: None,
        secure: None,
        centroids: CentroidPolicy::with_min_count(1.0),
    };
    let mut coord = Coordinator::new(cfg, model(shape, 5), seeded_rng(6)).expect("valid config");
    let round = coord.start_round(Instant::ZERO).expect("no round is open");
    let limits = Limits::for_shape(&shape);
    let layout = shape.layout();
    let devices: Vec<Vec<Rating>> = vec![
        vec![Rating { item: 0, value: 5.0 }, Rating { item: 3, value: 1.0 }],
        vec![Rating { item: 7, value: 4.0 }],
        vec![Rating { item: 11, value: 2.0 }],
    ];
    let far = Instant::ZERO.saturating_add(Duration::from_secs(3600));
    let mut clients: Vec<ClientRound<'_>> = devices.iter().map(|r| ClientRound::new(r, far)).collect();
    let frame_in = |frame: Vec<u8>, limit: usize| -> Vec<u8> {
        let prefix: [u8; LEN_PREFIX] = frame[..LEN_PREFIX].try_into().expect("prefix");
        let len = wire::frame_len(prefix, limit).expect("within the limit");
        assert_eq!(len, frame.len() - LEN_PREFIX);
        frame[LEN_PREFIX..].to_vec()
    };
    // The device driver's view: what it sent in its check-in, and its cached model.
    let check_in = CheckIn {
        token: b"t".to_vec(),
        sdk_version: "test".into(),
        capabilities: 0,
        cached_model_version: None,
    };
    let cached: Option<Arc<RoundModel>> = None;

    let mut deliveries = 0;
    for _ in 0..3 {
        // Devices → coordinator.
        for (id, client) in clients.iter_mut().enumerate() {
            while let Some(msg) = client.poll_transmit() {
                let frame = wire::encode(&Request::from_client_message(&msg, &check_in, [id as u8; 16]))
                    .expect("encodes");
                let req =
                    wire::decode_request(&frame_in(frame, limits.max_request()), &limits).expect("decodes");
                let msg = match req {
                    Request::CheckIn(c) => {
                        assert_eq!(c, check_in);
                        ClientMessage::CheckIn
                    }
                    Request::Upload(u) => u.into_client_message(&layout, coord.clip_norm()).expect("honest"),
                    other => unreachable!("a plain round sends no {other:?}"),
                };
                coord.handle_message(Instant::ZERO, id as u64, msg);
            }
        }
        // Coordinator → devices.
        while let Some((to, msg)) = coord.poll_transmit() {
            let resp =
                Response::from_server_message(&msg, check_in.cached_model_version, Duration::from_secs(60));
            let frame = wire::encode(&resp).expect("encodes");
            let resp =
                wire::decode_response(&frame_in(frame, limits.max_response()), &limits).expect("decodes");
            match resp.into_inbound(cached.as_ref()).expect("valid") {
                Inbound::Message(m) => clients[to as usize].handle_message(Instant::ZERO, m),
                Inbound::Error { code, message } => panic!("unexpected error {code}: {message}"),
                Inbound::Finished { .. } => panic!("the federation is not finished"),
            }
            deliveries += 1;
        }
    }
    assert_eq!(deliveries, 5, "3 check-in answers and 2 acks");
    let outcomes: Vec<_> = clients.iter().map(|c| c.outcome().cloned()).collect();
    assert!(
        matches!(outcomes[0], Some(ClientOutcome::Completed { round: r, .. }) if r == round),
        "{outcomes:?}"
    );
    assert!(matches!(outcomes[1], Some(ClientOutcome::Completed { .. })), "{outcomes:?}");
    assert_eq!(outcomes[2], Some(ClientOutcome::NotSelected));
    let events: Vec<_> = std::iter::from_fn(|| coord.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(e, CoordinatorEvent::RoundCommitted { .. })), "{events:?}");
}

// ---------------------------------------------------------------------------------------
// Properties: no input makes a decoder panic, and every message round-trips

fn any_check_in() -> impl Strategy<Value = CheckIn> {
    (
        prop::collection::vec(any::<u8>(), 0..=MAX_TOKEN_LEN),
        "\\PC{0,16}",
        any::<u32>(),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(token, sdk_version, capabilities, cached_model_version)| CheckIn {
            token,
            sdk_version,
            capabilities,
            cached_model_version,
        })
}

fn any_upload() -> impl Strategy<Value = Upload> {
    (
        any::<u64>(),
        prop::collection::vec(any::<f32>(), 0..48),
        prop::option::of(any::<bool>()),
        any::<[u8; 16]>(),
    )
        .prop_map(|(round, update, within_bound, nonce)| Upload { round, update, within_bound, nonce })
}

fn any_sealed_pairs() -> impl Strategy<Value = Vec<WireSealedPair>> {
    prop::collection::vec(
        (any::<u32>(), any::<u8>())
            .prop_map(|(peer, b)| WireSealedPair { peer, ciphertext: vec![b; SEALED_PAIR_LEN] }),
        0..4,
    )
}

fn any_revealed() -> impl Strategy<Value = Vec<WireRevealedShare>> {
    prop::collection::vec(
        (any::<u32>(), any::<u8>()).prop_map(|(owner, b)| WireRevealedShare { owner, share: [b; SHARE_LEN] }),
        0..4,
    )
}

/// Words of one width or the other: all below 2^32, or any.
fn any_words() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        prop::collection::vec(any::<u32>().prop_map(u64::from), 0..24),
        prop::collection::vec(any::<u64>(), 0..24),
    ]
}

fn any_secure_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u64>(), any::<[u8; 32]>(), any::<[u8; 32]>(), any::<[u8; 16]>()).prop_map(
            |(round, cipher_public, mask_public, nonce)| {
                Request::AdvertiseKeys(AdvertiseKeys { round, cipher_public, mask_public, nonce })
            }
        ),
        (any::<u64>(), any_sealed_pairs(), any::<[u8; 16]>()).prop_map(|(round, shares, nonce)| {
            Request::EncryptedShares(EncryptedShares { round, shares, nonce })
        }),
        (any::<u64>(), any_words(), any::<[u8; 16]>())
            .prop_map(|(round, words, nonce)| Request::MaskedInput(MaskedInput { round, words, nonce })),
        (any::<u64>(), any_revealed(), any_revealed(), any::<[u8; 16]>()).prop_map(
            |(round, mask_key_shares, self_mask_shares, nonce)| {
                Request::UnmaskShares(UnmaskShares { round, mask_key_shares, self_mask_shares, nonce })
            }
        ),
    ]
}

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any_check_in().prop_map(Request::CheckIn),
        any_upload().prop_map(Request::Upload),
        any_secure_request(),
    ]
}

fn any_secure_response() -> impl Strategy<Value = Response> {
    let neighbours = prop::collection::vec(
        (any::<u32>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
            |(index, cipher_public, mask_public)| WireNeighbour { index, cipher_public, mask_public },
        ),
        0..4,
    );
    prop_oneof![
        (any::<u64>(), any::<[u8; 32]>(), any::<[u32; 5]>(), neighbours).prop_map(
            |(round, seed, [n, k, t, bits, index], neighbours)| {
                Response::ShareKeys(WireShareKeys { round, seed, n, k, t, bits, index, neighbours })
            }
        ),
        (any::<u64>(), any_sealed_pairs())
            .prop_map(|(round, shares)| Response::MaskedInputRequest { round, shares }),
        (any::<u64>(), prop::collection::vec(any::<u32>(), 0..8), prop::collection::vec(any::<u32>(), 0..8))
            .prop_map(|(round, dropped, survivors)| Response::Unmask { round, dropped, survivors }),
    ]
}

fn any_floats() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(any::<f32>(), 0..24)
}

fn any_task() -> impl Strategy<Value = WireTask> {
    let model =
        (any::<u64>(), (0u64..8, 0u64..8, 0u64..8), any_floats(), any_floats(), any::<f32>(), any_floats())
            .prop_map(
                |(version, (n_items, dim, n_segments), item_factors, item_bias, global_mean, centroids)| {
                    WireModel {
                        version,
                        n_items,
                        dim,
                        n_segments,
                        item_factors,
                        item_bias,
                        global_mean,
                        centroids,
                    }
                },
            );
    let objective = prop_oneof![
        Just(WireObjective::Explicit),
        any::<f32>().prop_map(|alpha| WireObjective::Implicit { alpha })
    ];
    (
        (any::<u64>(), any::<u64>()),
        (objective, any::<[f32; 4]>()),
        any::<f32>(),
        any::<bool>(),
        any::<u64>(),
        (any_privacy(), prop::option::of(model)),
    )
        .prop_map(
            |(
                (round, model_version),
                (objective, l2),
                clip_norm,
                report_clip_bit,
                report_window_ms,
                (privacy, model),
            )| {
                WireTask {
                    round,
                    model_version,
                    train: WireTrainParams {
                        objective,
                        l2_user: l2[0],
                        l2_user_bias: l2[1],
                        l2_item: l2[2],
                        l2_item_bias: l2[3],
                        user_support_exponent: 0.0,
                    },
                    clip_norm,
                    report_clip_bit,
                    report_window_ms,
                    privacy: (&privacy).into(),
                    model,
                }
            },
        )
}

fn any_privacy() -> impl Strategy<Value = TaskPrivacy> {
    let mechanism = prop_oneof![
        Just(Mechanism::None),
        Just(Mechanism::CentralGaussian),
        Just(Mechanism::DistributedDiscreteGaussian),
        (3u16..).prop_map(Mechanism::Unknown),
    ];
    let aggregation = prop_oneof![
        Just(Aggregation::Plain),
        Just(Aggregation::Secure),
        (2u16..).prop_map(Aggregation::Unknown)
    ];
    let selection = prop_oneof![
        any::<f64>().prop_map(|q| TaskSelection::Poisson { q }),
        any::<u64>().prop_map(|cohort| TaskSelection::FirstCome { cohort }),
    ];
    (mechanism, any::<f32>(), selection, any::<u64>(), prop::option::of(any::<u64>()), aggregation).prop_map(
        |(mechanism, z, selection, min_reports, population, aggregation)| TaskPrivacy {
            mechanism,
            noise_multiplier: f64::from(z),
            clip_norm: 1.0,
            selection,
            min_reports,
            population,
            aggregation,
        },
    )
}

fn any_response() -> impl Strategy<Value = Response> {
    prop_oneof![
        any_task().prop_map(Response::Task),
        (any::<u64>(), any::<u64>())
            .prop_map(|(round, retry_after_ms)| Response::NotSelected { round, retry_after_ms }),
        any::<u64>().prop_map(|round| Response::Ack { round }),
        (prop::sample::select(ErrorCode::ALL.to_vec()), "\\PC{0,64}", any::<Option<u64>>())
            .prop_map(|(code, message, retry_after_ms)| Response::Error { code, message, retry_after_ms }),
        any::<u64>().prop_map(|round| Response::Aborted { round }),
        any_secure_response(),
    ]
}

/// An edit of a payload: overwrite, truncate, insert or remove a byte.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
}

fn any_edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(mut p: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        match *e {
            Edit::Set(i, b) if !p.is_empty() => {
                let n = p.len();
                p[i % n] = b;
            }
            Edit::Truncate(i) => p.truncate(i % (p.len() + 1)),
            Edit::Insert(i, b) => {
                let n = p.len();
                p.insert(i % (n + 1), b);
            }
            Edit::Remove(i) if !p.is_empty() => {
                let n = p.len();
                p.remove(i % n);
            }
            _ => {}
        }
    }
    p
}

/// Runs every decoder on `bytes`, then every conversion on what decodes; any panic fails
/// the property. Returns whether anything decoded.
fn decode_everything(bytes: &[u8]) -> bool {
    let layout = SHAPE.layout();
    let cached = round_model(3);
    let mut decoded = false;
    for l in [limits(), roomy(), Limits::for_shape(&ModelShape { n_items: 1, dim: 1, n_segments: 1 })] {
        if let Ok(prefix) = <[u8; LEN_PREFIX]>::try_from(bytes.get(..LEN_PREFIX).unwrap_or(&[])) {
            let _ = wire::frame_len(prefix, l.max_request());
        }
        if let Ok(r) = wire::decode_request(bytes, &l) {
            decoded = true;
            match r {
                Request::Upload(u) => drop(u.verify(&layout, 1.0)),
                Request::AdvertiseKeys(m) => drop(m.into_client_message()),
                Request::EncryptedShares(m) => drop(m.into_client_message()),
                Request::MaskedInput(m) => drop(m.into_client_message(&layout)),
                Request::UnmaskShares(m) => drop(m.into_client_message()),
                _ => {}
            }
        }
        if let Ok(r) = wire::decode_response(bytes, &l) {
            decoded = true;
            let _ = r.into_inbound(Some(&cached));
        }
    }
    decoded
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_everything(&bytes);
    }

    #[test]
    fn random_bodies_after_a_valid_header_never_panic(
        kind in 0u8..10,
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![V, kind];
        bytes.extend(body);
        decode_everything(&bytes);
    }

    #[test]
    fn edited_requests_never_panic(r in any_request(), edits in any_edits()) {
        decode_everything(&apply(payload(&r), &edits));
    }

    #[test]
    fn edited_responses_never_panic(r in any_response(), edits in any_edits()) {
        decode_everything(&apply(payload(&r), &edits));
    }

    #[test]
    fn requests_round_trip(r in any_request()) {
        let p = payload(&r);
        let back = wire::decode_request(&p, &roomy()).expect("decodes");
        // Bytes, not values: floats compare bitwise (NaN included).
        prop_assert_eq!(payload(&back), p);
    }

    #[test]
    fn responses_round_trip(r in any_response()) {
        let p = payload(&r);
        let back = wire::decode_response(&p, &roomy()).expect("decodes");
        prop_assert_eq!(payload(&back), p);
    }

    #[test]
    fn every_truncation_of_a_message_is_refused(r in any_response(), q in any_request()) {
        // A message is never a prefix of another of its kind (a request's prefix can be a
        // valid response, and the other way round, which is harmless).
        let (r, q) = (payload(&r), payload(&q));
        for cut in 0..r.len() {
            prop_assert!(wire::decode_response(&r[..cut], &roomy()).is_err());
        }
        for cut in 0..q.len() {
            prop_assert!(wire::decode_request(&q[..cut], &roomy()).is_err());
        }
    }

    #[test]
    fn oversize_payloads_are_refused_before_parsing(
        extra in 1usize..64,
        fill in any::<u8>(),
        n_items in 1usize..50,
    ) {
        let l = Limits::for_shape(&ModelShape { n_items, dim: 2, n_segments: 2 });
        let req = vec![fill; l.max_request() + extra];
        prop_assert_eq!(
            wire::decode_request(&req, &l),
            Err(WireError::TooLarge { len: req.len(), limit: l.max_request() })
        );
        let resp = vec![fill; l.max_response() + extra];
        prop_assert_eq!(
            wire::decode_response(&resp, &l),
            Err(WireError::TooLarge { len: resp.len(), limit: l.max_response() })
        );
        let announced = u32::try_from(l.max_request() + extra).expect("small");
        let refused = matches!(
            wire::frame_len(announced.to_le_bytes(), l.max_request()),
            Err(WireError::TooLarge { .. })
        );
        prop_assert!(refused);
    }
}

/// A check-in's Debug output (logs, panics) never shows the enrollment token.
#[test]
fn check_in_debug_hides_the_token() {
    let mut c = check_in(None);
    c.token = b"SECRET-TOKEN-BYTES".to_vec();
    let shown = format!("{c:?} {:?}", Request::CheckIn(c.clone()));
    assert!(!shown.contains("SECRET"), "{shown}");
    let as_numbers = format!("{:?}", &c.token[..4]);
    assert!(!shown.contains(&as_numbers[1..as_numbers.len() - 1]), "{shown}");
    assert!(shown.contains("<18 bytes>"), "{shown}");
}

#[test]
fn a_finished_federation_hands_over_its_final_model() {
    let m = round_model(4);
    let Inbound::Finished { model_version, model: Some(got) } =
        Response::finished(&m, None).into_inbound(None).expect("valid")
    else {
        panic!("a finished answer with the model")
    };
    assert_eq!(model_version, m.version);
    assert_eq!(WireModel::from(&*got), WireModel::from(&*m));
    let Inbound::Finished { model: None, .. } =
        Response::finished(&m, Some(m.version)).into_inbound(None).expect("valid")
    else {
        panic!("a device that holds the final model is not sent it again")
    };
    let mismatched = Response::Finished { model_version: m.version + 1, model: Some(WireModel::from(&*m)) };
    assert!(mismatched.into_inbound(None).is_err(), "the model must be the version the answer names");
}

// ---------------------------------------------------------------------------------------
// Secure aggregation (protocol v2 and later)

/// A model shape the size of ML-100K's (1,682 items, 32 dimensions, 8 segments; 55,771 values).
const ML_100K: ModelShape = ModelShape { n_items: 1682, dim: 32, n_segments: 8 };

/// Every secure message at its largest: the longest lists, every varint at its longest.
fn largest_secure_messages(shape: &ModelShape) -> (Vec<Request>, Vec<Response>) {
    let pairs = |n: usize| -> Vec<WireSealedPair> {
        (0..n).map(|_| WireSealedPair { peer: u32::MAX, ciphertext: vec![0xff; SEALED_PAIR_LEN] }).collect()
    };
    let shares = |n: usize| -> Vec<WireRevealedShare> {
        (0..n).map(|_| WireRevealedShare { owner: u32::MAX, share: [0xff; SHARE_LEN] }).collect()
    };
    let requests = vec![
        Request::AdvertiseKeys(AdvertiseKeys {
            round: u64::MAX,
            cipher_public: [0xff; 32],
            mask_public: [0xff; 32],
            nonce: [0xff; 16],
        }),
        Request::EncryptedShares(EncryptedShares {
            round: u64::MAX,
            shares: pairs(MAX_NEIGHBOURS),
            nonce: [0xff; 16],
        }),
        Request::MaskedInput(MaskedInput {
            round: u64::MAX,
            words: vec![u64::MAX; shape.layout().len() + 1],
            nonce: [0xff; 16],
        }),
        // Both splits of the MAX_NEIGHBOURS + 1 shares.
        Request::UnmaskShares(UnmaskShares {
            round: u64::MAX,
            mask_key_shares: shares(MAX_NEIGHBOURS),
            self_mask_shares: shares(1),
            nonce: [0xff; 16],
        }),
        Request::UnmaskShares(UnmaskShares {
            round: u64::MAX,
            mask_key_shares: Vec::new(),
            self_mask_shares: shares(MAX_NEIGHBOURS + 1),
            nonce: [0xff; 16],
        }),
    ];
    let responses = vec![
        Response::ShareKeys(WireShareKeys {
            round: u64::MAX,
            seed: [0xff; 32],
            n: u32::MAX,
            k: u32::MAX,
            t: u32::MAX,
            bits: u32::MAX,
            index: u32::MAX,
            neighbours: vec![
                WireNeighbour {
                    index: u32::MAX,
                    cipher_public: [0xff; 32],
                    mask_public: [0xff; 32]
                };
                MAX_NEIGHBOURS
            ],
        }),
        Response::MaskedInputRequest { round: u64::MAX, shares: pairs(MAX_NEIGHBOURS) },
        Response::Unmask { round: u64::MAX, dropped: vec![u32::MAX; MAX_NEIGHBOURS], survivors: Vec::new() },
        Response::Unmask { round: u64::MAX, dropped: Vec::new(), survivors: vec![u32::MAX; MAX_NEIGHBOURS] },
    ];
    (requests, responses)
}

/// The limit of a request's own kind.
fn request_limit(r: &Request, l: &Limits) -> usize {
    match r {
        Request::AdvertiseKeys(_) => l.advertise_keys(),
        Request::EncryptedShares(_) => l.sealed_pairs(),
        Request::MaskedInput(_) => l.masked_input(),
        Request::UnmaskShares(_) => l.unmask_shares(),
        other => panic!("not a secure request: {other:?}"),
    }
}

/// The limit of a response's own kind.
fn response_limit(r: &Response, l: &Limits) -> usize {
    match r {
        Response::ShareKeys(_) => l.share_keys(),
        Response::MaskedInputRequest { .. } => l.sealed_pairs(),
        Response::Unmask { .. } => l.unmask(),
        other => panic!("not a secure response: {other:?}"),
    }
}

#[test]
fn secure_messages_round_trip_at_their_limits() {
    for shape in [SHAPE, ML_100K] {
        let l = Limits::for_shape(&shape);
        let (requests, responses) = largest_secure_messages(&shape);
        for r in &requests {
            let p = payload(r);
            assert!(p.len() <= request_limit(r, &l), "{} > {}", p.len(), request_limit(r, &l));
            assert!(p.len() <= l.max_request());
            assert_eq!(&wire::decode_request(&p, &l).expect("decodes"), r);
        }
        for r in &responses {
            let p = payload(r);
            assert!(p.len() <= response_limit(r, &l), "{} > {}", p.len(), response_limit(r, &l));
            assert!(p.len() <= l.max_response());
            assert_eq!(&wire::decode_response(&p, &l).expect("decodes"), r);
        }
    }
    // The documented numbers.
    let l = Limits::for_shape(&ML_100K);
    assert_eq!(ML_100K.layout().len(), 55_771);
    assert_eq!(
        (
            l.advertise_keys(),
            l.sealed_pairs(),
            l.masked_input(),
            l.unmask_shares(),
            l.share_keys(),
            l.unmask()
        ),
        (128, 112_704, 446_240, 50_289, 70_784, 5_184)
    );
    assert_eq!((l.max_request(), l.max_response()), (446_240, l.task()));
}

#[test]
fn secure_message_sizes_match_the_protocol_page() {
    // docs/secagg.md: EncryptedShares 8 + 108·k, MaskedInput 8 + w·d, before framing; the
    // wire adds the version, variant index, list count and nonce, and one byte a pair.
    let k = 86;
    let shares = EncryptedShares {
        round: 1 << 20,
        shares: (0..k)
            .map(|j| WireSealedPair { peer: j * 100, ciphertext: vec![0; SEALED_PAIR_LEN] })
            .collect(),
        nonce: [0; 16],
    };
    let p = payload(&Request::EncryptedShares(shares));
    assert!(p.len() <= 8 + 108 * k as usize + 16 + 4 + k as usize, "{}", p.len());
    // Masked words in a ring of ≤ 32 bits take 4 bytes each, like the f32 upload.
    let d = ML_100K.layout().len() + 1;
    let narrow = payload(&Request::MaskedInput(MaskedInput {
        round: 1,
        words: vec![u64::from(u32::MAX); d],
        nonce: [0; 16],
    }));
    let wide =
        payload(&Request::MaskedInput(MaskedInput { round: 1, words: vec![1 << 32; d], nonce: [0; 16] }));
    assert_eq!(narrow.len(), 2 + 1 + 3 + 1 + 4 * d + 16);
    assert_eq!(wide.len(), 2 + 1 + 3 + 1 + 8 * d + 16);
}

#[test]
fn oversize_secure_messages_are_refused_per_kind() {
    // A big model: its largest request and response are far above every secure kind's own
    // limit, so each kind is refused by its own limit, before its body is parsed.
    let big = Limits::for_shape(&ModelShape { n_items: 10_000, dim: 16, n_segments: 8 });
    let kinds: [(bool, u8, usize); 7] = [
        (true, 3, big.advertise_keys()),
        (true, 4, big.sealed_pairs()),
        (true, 5, big.masked_input()),
        (true, 6, big.unmask_shares()),
        (false, 7, big.share_keys()),
        (false, 8, big.sealed_pairs()),
        (false, 9, big.unmask()),
    ];
    for (is_request, kind, limit) in kinds {
        let mut p = vec![0u8; limit + 1];
        p[0] = 3;
        p[1] = kind;
        let want = Err(WireError::TooLarge { len: limit + 1, limit });
        if is_request {
            // The masked input is the largest request: its limit is the frame limit.
            assert!(limit < big.max_request() || kind == 5, "kind {kind}");
            assert_eq!(wire::decode_request(&p, &big).map(|_| ()), want, "request kind {kind}");
        } else {
            assert!(limit < big.max_response(), "kind {kind}");
            assert_eq!(wire::decode_response(&p, &big).map(|_| ()), want, "response kind {kind}");
        }
    }
    // A masked input for a bigger model than the round's.
    let l = limits();
    let n = SHAPE.layout().len();
    let long = MaskedInput { round: 1, words: vec![u64::MAX; n + 10], nonce: [0; 16] };
    assert!(matches!(
        wire::decode_request(&payload(&Request::MaskedInput(long)), &l),
        Err(WireError::TooLarge { .. })
    ));
    // Within the size limit but longer than the layout and its clip bit: the conversion refuses it.
    let over = MaskedInput { round: 1, words: vec![u64::MAX; n + 2], nonce: [0; 16] };
    let Ok(Request::MaskedInput(m)) = wire::decode_request(&payload(&Request::MaskedInput(over)), &l) else {
        panic!("fits the size limit")
    };
    assert!(matches!(m.into_client_message(&SHAPE.layout()), Err(WireError::Invalid(_))));
    let fits = MaskedInput { round: 1, words: vec![u64::MAX; n + 1], nonce: [0; 16] };
    assert!(fits.into_client_message(&SHAPE.layout()).is_ok());
}

#[test]
fn too_many_neighbours_are_refused_by_both_sides() {
    let l = Limits::for_shape(&ML_100K);
    let pair = WireSealedPair { peer: 0, ciphertext: vec![0; SEALED_PAIR_LEN] };
    let share = WireRevealedShare { owner: 0, share: [0; SHARE_LEN] };
    let nb = WireNeighbour { index: 0, cipher_public: [0; 32], mask_public: [0; 32] };
    let requests = [
        Request::EncryptedShares(EncryptedShares {
            round: 0,
            shares: vec![pair.clone(); MAX_NEIGHBOURS + 1],
            nonce: [0; 16],
        }),
        Request::UnmaskShares(UnmaskShares {
            round: 0,
            mask_key_shares: vec![share.clone(); 2],
            self_mask_shares: vec![share.clone(); MAX_NEIGHBOURS],
            nonce: [0; 16],
        }),
    ];
    for r in &requests {
        assert!(matches!(wire::encode(r), Err(WireError::Invalid(_))), "{r:?}");
    }
    let responses = [
        Response::ShareKeys(WireShareKeys {
            round: 0,
            seed: [0; 32],
            n: 2000,
            k: 1999,
            t: 2,
            bits: 32,
            index: 0,
            neighbours: vec![nb; MAX_NEIGHBOURS + 1],
        }),
        Response::MaskedInputRequest { round: 0, shares: vec![pair.clone(); MAX_NEIGHBOURS + 1] },
        Response::Unmask { round: 0, dropped: vec![1; 600], survivors: vec![2; MAX_NEIGHBOURS + 1 - 600] },
    ];
    for r in &responses {
        assert!(matches!(wire::encode(r), Err(WireError::Invalid(_))), "{r:?}");
    }
    // Hand-built, since the encoder refuses them: the decoder refuses them too (a list
    // beyond MAX_NEIGHBOURS + 1 already while reading it, a longer one by its size).
    let mut p = vec![V, 9, 0];
    p.extend(varint(600));
    p.extend(vec![1; 600]);
    p.extend(varint(MAX_NEIGHBOURS as u64 + 1 - 600));
    p.extend(vec![2; MAX_NEIGHBOURS + 1 - 600]);
    assert!(matches!(wire::decode_response(&p, &l), Err(WireError::Invalid(_))));
    let mut p = vec![V, 4, 0];
    p.extend(varint(MAX_NEIGHBOURS as u64 + 1));
    for _ in 0..=MAX_NEIGHBOURS {
        p.extend([0, SEALED_PAIR_LEN as u8]);
        p.extend([0; SEALED_PAIR_LEN]);
    }
    p.extend([0; 16]);
    assert!(matches!(wire::decode_request(&p, &l), Err(WireError::Invalid(_))));
    let mut p = vec![V, 8, 0];
    p.extend(varint(MAX_NEIGHBOURS as u64 + 2));
    p.extend([0; 64]);
    assert!(matches!(wire::decode_response(&p, &l), Err(WireError::Malformed(_))));
}

#[test]
fn malformed_secure_messages_are_refused() {
    let l = limits();
    let malformed = |r: Result<Request, WireError>| matches!(r, Err(WireError::Malformed(_)));
    // Masked words: version, MaskedInput, round 1, then the byte string, then the nonce.
    let words = |bytes: &[u8]| {
        let mut p = vec![V, 5, 1];
        p.extend(varint(bytes.len() as u64));
        p.extend(bytes);
        p.extend([0; 16]);
        p
    };
    assert!(wire::decode_request(&words(&[4, 1, 0, 0, 0]), &l).is_ok());
    assert!(wire::decode_request(&words(&[8, 1, 0, 0, 0, 0, 0, 0, 0]), &l).is_ok());
    assert!(wire::decode_request(&words(&[4]), &l).is_ok(), "no words");
    assert!(wire::decode_request(&words(&[1, 1, 0, 0, 0]), &l).is_ok(), "four 1-byte words");
    assert!(wire::decode_request(&words(&[2, 1, 0, 0, 0]), &l).is_ok(), "two 2-byte words");
    assert!(malformed(wire::decode_request(&words(&[2, 1, 0, 0]), &l)), "3 bytes of width 2");
    assert!(malformed(wire::decode_request(&words(&[]), &l)), "no width byte");
    for width in [0u8, 3, 5, 6, 7, 9, 16, 255] {
        assert!(
            malformed(wire::decode_request(&words(&[width, 1, 0, 0, 0, 0, 0, 0, 0]), &l)),
            "width {width}"
        );
    }
    assert!(malformed(wire::decode_request(&words(&[4, 1, 0, 0]), &l)), "3 bytes of width 4");
    assert!(malformed(wire::decode_request(&words(&[4, 1, 0, 0, 0, 0]), &l)), "5 bytes of width 4");
    assert!(malformed(wire::decode_request(&words(&[8, 1, 0, 0, 0]), &l)), "4 bytes of width 8");
    assert!(
        malformed(wire::decode_request(&words(&[8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), &l)),
        "12 bytes of width 8"
    );

    // Ciphertexts of the wrong length: refused by the encoder, by the decoder, and by the
    // conversions (for values built in memory).
    for len in [0, 1, SEALED_PAIR_LEN - 1, SEALED_PAIR_LEN + 1, 2 * SEALED_PAIR_LEN] {
        let bad = vec![WireSealedPair { peer: 1, ciphertext: vec![0; len] }];
        let req = EncryptedShares { round: 0, shares: bad.clone(), nonce: [0; 16] };
        assert!(matches!(wire::encode(&Request::EncryptedShares(req.clone())), Err(WireError::Invalid(_))));
        assert!(matches!(req.into_client_message(), Err(WireError::Invalid(_))), "{len}");
        let resp = Response::MaskedInputRequest { round: 0, shares: bad };
        assert!(matches!(wire::encode(&resp), Err(WireError::Invalid(_))));
        assert!(matches!(resp.into_inbound(None), Err(WireError::Invalid(_))), "{len}");
        let mut p = vec![V, 4, 0, 1, 1];
        p.extend(varint(len as u64));
        p.extend(vec![0; len]);
        p.extend([0; 16]);
        assert!(matches!(wire::decode_request(&p, &l), Err(WireError::Invalid(_))), "{len}");
        let mut p = vec![V, 8, 0, 1, 1];
        p.extend(varint(len as u64));
        p.extend(vec![0; len]);
        assert!(matches!(wire::decode_response(&p, &l), Err(WireError::Invalid(_))), "{len}");
    }
    // A revealed share cut short, and keys cut short.
    let mut p = vec![V, 6, 0, 1, 0];
    p.extend([0; SHARE_LEN - 1]);
    assert!(malformed(wire::decode_request(&p, &l)));
    let mut p = vec![V, 3, 0];
    p.extend([0; 32 + 31 + 16]);
    assert!(malformed(wire::decode_request(&p, &l)));
    // Trailing bytes after a secure message.
    let mut p = payload(&Request::AdvertiseKeys(AdvertiseKeys {
        round: 0,
        cipher_public: [1; 32],
        mask_public: [2; 32],
        nonce: [0; 16],
    }));
    p.push(0);
    assert!(malformed(wire::decode_request(&p, &l)));
}

#[test]
fn a_huge_secure_list_count_allocates_nothing_and_fails() {
    // Were a list count or a length used to pre-allocate, this would abort instead of failing.
    let l = limits();
    for claim in [1u64 << 20, 1 << 40, u64::MAX >> 1, u64::MAX] {
        for prefix in [vec![V, 4, 0], vec![V, 6, 0], vec![V, 6, 0, 0]] {
            let mut p = prefix.clone();
            p.extend(varint(claim));
            p.extend([0; 8]);
            assert!(wire::decode_request(&p, &l).is_err(), "{prefix:?} {claim}");
        }
        for prefix in [vec![V, 7, 0], vec![V, 8, 0], vec![V, 9, 0], vec![V, 9, 0, 0]] {
            let mut p = prefix.clone();
            if prefix[1] == 7 {
                p.extend([0; 32 + 5]);
            }
            p.extend(varint(claim));
            p.extend([0; 8]);
            assert!(wire::decode_response(&p, &l).is_err(), "{prefix:?} {claim}");
        }
        let mut p = vec![V, 5, 0];
        p.extend(varint(claim));
        p.extend([4, 0, 0, 0, 0]);
        assert!(malformed(&wire::decode_request(&p, &l)), "words {claim}");
    }
    fn malformed(r: &Result<Request, WireError>) -> bool {
        matches!(r, Err(WireError::Malformed(_)))
    }
}

#[test]
fn older_peers_are_told_version_mismatch() {
    // A v1 check-in, byte for byte as a v1 device sends it (the first known answer of v1); a
    // v2 check-in differs only in its version byte.
    let v1_check_in = [0x01, 0x00, 0x03, b't', b'o', b'k', 0x03, b'1', b'.', b'0', 0x00, 0x01, 0xac, 0x02];
    let l = limits();
    for old in [1u8, 2] {
        let mut check_in = v1_check_in;
        check_in[0] = old;
        let want = Err(WireError::VersionMismatch { got: u16::from(old), expected: 3 });
        assert_eq!(wire::decode_request(&check_in, &l), want);
        // An ack, as a v3 device would receive it from an older coordinator.
        assert_eq!(wire::decode_response(&[old, 0x02, 0x05], &l), want.map(|_: Request| unreachable!()));
    }
    // The same check-in as a v3 payload decodes: its layout did not change.
    let mut v3 = v1_check_in;
    v3[0] = 3;
    assert!(matches!(wire::decode_request(&v3, &l), Ok(Request::CheckIn(_))));
    // The coordinator answers with this code; the ALPN says the version too (TLS refuses an
    // older peer before any payload: `tests/tests/coordinator_hardening.rs`).
    assert_eq!(WireError::VersionMismatch { got: 2, expected: 3 }.code(), ErrorCode::VersionMismatch);
    assert_eq!(wire::ALPN, format!("fedrec/{PROTOCOL_VERSION}").as_bytes());
    assert_ne!(wire::ALPN, b"fedrec/1");
    assert_ne!(wire::ALPN, b"fedrec/2");
}

#[test]
fn secure_server_messages_convert_both_ways() {
    let neighbours: Vec<NeighbourKeys> = [0u32, 2, 3]
        .iter()
        .map(|&j| NeighbourKeys { index: j, cipher_public: [j as u8; 32], mask_public: [j as u8 + 100; 32] })
        .collect();
    let share_keys = ShareKeysRequest {
        round: 11,
        setup: SecAggSetup { seed: [9; 32], n: 4, k: 3, t: 2, bits: 24 },
        index: 1,
        neighbours,
    };
    let sealed = |j: u32| EncryptedShare { peer: j, ciphertext: vec![j as u8; SEALED_PAIR_BYTES] };
    let masked = MaskedInputRequest { round: 11, shares: vec![sealed(0), sealed(3)] };
    let unmask = UnmaskRequest { round: 11, dropped: vec![3], survivors: vec![0] };
    let retry = Duration::from_secs(1);
    let through_the_wire = |msg: ServerMessage| -> ServerMessage {
        let r = Response::from_server_message(&msg, None, retry);
        let back = wire::decode_response(&payload(&r), &limits()).expect("decodes");
        assert_eq!(back, r);
        match back.into_inbound(None).expect("converts") {
            Inbound::Message(m) => m,
            other => panic!("a round message, got {other:?}"),
        }
    };
    match through_the_wire(ServerMessage::ShareKeys(share_keys.clone())) {
        ServerMessage::ShareKeys(got) => assert_eq!(got, share_keys),
        other => panic!("share keys, got {other:?}"),
    }
    match through_the_wire(ServerMessage::MaskedInputRequest(masked.clone())) {
        ServerMessage::MaskedInputRequest(got) => assert_eq!(got, masked),
        other => panic!("masked-input request, got {other:?}"),
    }
    match through_the_wire(ServerMessage::Unmask(unmask.clone())) {
        ServerMessage::Unmask(got) => assert_eq!(got, unmask),
        other => panic!("unmask, got {other:?}"),
    }
}

#[test]
fn secure_client_messages_convert_both_ways() {
    let ci = check_in(None);
    let layout = SHAPE.layout();
    let through_the_wire = |msg: &ClientMessage, nonce: [u8; 16]| -> ClientMessage {
        let r = Request::from_client_message(msg, &ci, nonce);
        assert_eq!(r.nonce(), Some(nonce), "the driver's nonce is sent");
        assert_eq!(r.round(), Some(11));
        let back = wire::decode_request(&payload(&r), &limits()).expect("decodes");
        assert_eq!(back, r);
        match back {
            Request::AdvertiseKeys(m) => m.into_client_message(),
            Request::EncryptedShares(m) => m.into_client_message().expect("converts"),
            Request::MaskedInput(m) => m.into_client_message(&layout).expect("converts"),
            Request::UnmaskShares(m) => m.into_client_message().expect("converts"),
            other => panic!("a secure request, got {other:?}"),
        }
    };
    let keys = ClientMessage::AdvertiseKeys { round: 11, cipher_public: [1; 32], mask_public: [2; 32] };
    match through_the_wire(&keys, [3; 16]) {
        ClientMessage::AdvertiseKeys { round, cipher_public, mask_public } => {
            assert_eq!((round, cipher_public, mask_public), (11, [1; 32], [2; 32]));
        }
        other => panic!("keys, got {other:?}"),
    }
    let shares: Vec<EncryptedShare> = (0..3)
        .map(|j| EncryptedShare { peer: j * 7, ciphertext: vec![j as u8; SEALED_PAIR_BYTES] })
        .collect();
    match through_the_wire(&ClientMessage::EncryptedShares { round: 11, shares: shares.clone() }, [4; 16]) {
        ClientMessage::EncryptedShares { round, shares: got } => assert_eq!((round, got), (11, shares)),
        other => panic!("shares, got {other:?}"),
    }
    for words in [vec![0, 5, (1 << 20) - 1], vec![1 << 40, 0, u64::MAX], vec![0; layout.len() + 1]] {
        match through_the_wire(&ClientMessage::MaskedInput { round: 11, words: words.clone() }, [5; 16]) {
            ClientMessage::MaskedInput { round, words: got } => assert_eq!((round, got), (11, words)),
            other => panic!("masked input, got {other:?}"),
        }
    }
    let reveal = |owner: u32| RevealedShare { owner, share: [owner as u8; SHARE_LEN] };
    let answer = fedrec_shared::round::UnmaskShares {
        round: 11,
        mask_key_shares: vec![reveal(3)],
        self_mask_shares: vec![reveal(0), reveal(1)],
    };
    match through_the_wire(&ClientMessage::UnmaskShares(answer.clone()), [6; 16]) {
        ClientMessage::UnmaskShares(got) => assert_eq!(got, answer),
        other => panic!("unmask shares, got {other:?}"),
    }
}

/// The secure phases of a round (the real device and coordinator machines of
/// `round::secure`), every message carried as bytes: encoded, decoded within the limits and
/// converted on the other side. One device drops after sharing, so the unmask phase has both
/// lists. The coordinator must recover exactly the survivors' sum.
#[test]
fn a_secure_round_runs_over_the_wire() {
    use fedrec_shared::privacy::discrete::Grid;
    use fedrec_shared::round::secure::{DeviceSecAgg, SecurePolicy, ServerSecAgg};

    let (round, n, dropped) = (4u64, 12usize, 3usize);
    let layout = SHAPE.layout();
    let d = layout.len();
    let l = limits();
    let grid = Grid::for_secure_sum(1.0, d).expect("a grid");
    let mut rng = seeded_rng(21);
    let ci = check_in(None);
    let encoded: Vec<Vec<i64>> =
        (0..n).map(|i| (0..d).map(|j| (i as i64 - 5) * (j as i64 + 1) - 3).collect()).collect();
    let mut server = ServerSecAgg::new(round, d, grid, false, 0.1, 0.05);
    let mut devices = Vec::new();

    // Device → coordinator, as bytes.
    let up = |msg: ClientMessage| -> ClientMessage {
        let r = Request::from_client_message(&msg, &ci, [7; 16]);
        let p = payload(&r);
        assert!(p.len() <= l.max_request());
        match wire::decode_request(&p, &l).expect("decodes") {
            Request::AdvertiseKeys(m) => m.into_client_message(),
            Request::EncryptedShares(m) => m.into_client_message().expect("converts"),
            Request::MaskedInput(m) => m.into_client_message(&layout).expect("converts"),
            Request::UnmaskShares(m) => m.into_client_message().expect("converts"),
            other => panic!("a secure request, got {other:?}"),
        }
    };
    // Coordinator → device, as bytes.
    let down = |msg: ServerMessage| -> ServerMessage {
        let p = payload(&Response::from_server_message(&msg, None, Duration::ZERO));
        assert!(p.len() <= l.max_response());
        match wire::decode_response(&p, &l).expect("decodes").into_inbound(None).expect("converts") {
            Inbound::Message(m) => m,
            other => panic!("a round message, got {other:?}"),
        }
    };

    for (i, x) in encoded.iter().enumerate() {
        let (device, c, s) =
            DeviceSecAgg::new(round, x.clone(), grid, false, SecurePolicy::default(), &mut rng);
        devices.push(device);
        let ClientMessage::AdvertiseKeys { cipher_public, mask_public, .. } =
            up(ClientMessage::AdvertiseKeys { round, cipher_public: c, mask_public: s })
        else {
            panic!("keys")
        };
        server.add_keys(i as u64, cipher_public, mask_public).expect("keys accepted");
    }
    for (client, req) in server.close_keys(&mut rng).expect("parameters") {
        let ServerMessage::ShareKeys(req) = down(ServerMessage::ShareKeys(req)) else { panic!("share keys") };
        let shares = devices[client as usize].share_keys(req, &mut rng).expect("the device shares");
        let ClientMessage::EncryptedShares { shares, .. } =
            up(ClientMessage::EncryptedShares { round, shares })
        else {
            panic!("shares")
        };
        server.add_shares(client, shares).expect("shares accepted");
    }
    for (client, req) in server.close_shares().expect("enough shared") {
        let ServerMessage::MaskedInputRequest(req) = down(ServerMessage::MaskedInputRequest(req)) else {
            panic!("masked-input request")
        };
        let words = devices[client as usize].masked_input(req).expect("the device masks");
        if client as usize == dropped {
            continue;
        }
        let ClientMessage::MaskedInput { words, .. } = up(ClientMessage::MaskedInput { round, words }) else {
            panic!("masked input")
        };
        server.add_masked(client, &words).expect("masked input accepted");
    }
    for (client, req) in server.close_masked().expect("enough masked") {
        let ServerMessage::Unmask(req) = down(ServerMessage::Unmask(req)) else { panic!("unmask") };
        let answer = devices[client as usize].unmask(&req).expect("the device unmasks");
        let ClientMessage::UnmaskShares(answer) = up(ClientMessage::UnmaskShares(answer)) else {
            panic!("unmask shares")
        };
        server.add_unmask(client, answer).expect("shares accepted");
    }
    let (sum, count) = server.finish().expect("unmasked");
    let want: Vec<i64> =
        (0..d).map(|j| (0..n).filter(|&i| i != dropped).map(|i| encoded[i][j]).sum()).collect();
    assert_eq!((sum, count), (want, n - 1));
}

/// Masked words take the narrowest width every word fits (known answers): one byte up to
/// `2^8`, two up to `2^16` (distributed noise's 16-bit ring: half the bytes of a 32-bit ring),
/// four up to `2^32`, else eight; each round-trips.
#[test]
fn masked_words_take_the_narrowest_width() {
    let l = roomy();
    for (words, width, body) in [
        (vec![0u64, 0xff], 1u8, vec![0x00, 0xff]),
        (vec![0x1234, 0xffff], 2, vec![0x34, 0x12, 0xff, 0xff]),
        (vec![0x1_0000], 4, vec![0x00, 0x00, 0x01, 0x00]),
        (vec![1 << 32], 8, vec![0, 0, 0, 0, 1, 0, 0, 0]),
        (vec![], 1, vec![]),
    ] {
        let req = Request::MaskedInput(MaskedInput { round: 1, words: words.clone(), nonce: [7; 16] });
        let frame = wire::encode(&req).expect("encodes");
        let mut string = vec![width];
        string.extend(&body);
        let mut expected = varint(string.len() as u64);
        expected.extend(&string);
        assert!(frame.windows(expected.len()).any(|w| w == expected.as_slice()), "{words:?}: {frame:?}");
        let payload = &frame[wire::LEN_PREFIX..];
        assert_eq!(wire::decode_request(payload, &l).expect("decodes"), req, "{words:?}");
    }
}
