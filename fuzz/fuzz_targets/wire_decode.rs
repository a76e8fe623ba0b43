//! Fuzzes every decoder of the wire format, and every conversion of what decodes, on arbitrary bytes.
//!
//! Properties: nothing panics; whatever decodes re-encodes, and decoding that encoding gives
//! the same bytes again (compared as bytes, so that NaNs compare equal). Every request and
//! response kind of protocol v2 is reached, the secure-aggregation ones included (their word
//! arrays, sealed pairs, revealed shares and neighbour lists), and so is every conversion.

#![no_main]

use std::sync::Arc;

use fedrec_shared::wire::{self, LEN_PREFIX, Limits, PROTOCOL_VERSION, Request, Response, rules};
use fedrec_shared::{ModelShape, RoundModel};
use libfuzzer_sys::fuzz_target;

/// Two shapes: a tiny one (limits small enough for the fuzzer to exceed) and a roomier one.
const SHAPES: [ModelShape; 2] =
    [ModelShape { n_items: 1, dim: 1, n_segments: 1 }, ModelShape { n_items: 16, dim: 4, n_segments: 2 }];

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.first_chunk::<LEN_PREFIX>() {
        for shape in &SHAPES {
            let limits = Limits::for_shape(shape);
            let _ = wire::frame_len(*prefix, limits.max_request());
            let _ = wire::frame_len(*prefix, limits.max_response());
        }
    }
    decode_all(data);
    // The same bytes as the body of a current-version message of the kind the first byte
    // picks (request kinds 0–6, response kinds 0–9), so that every decoder, the
    // secure-aggregation ones included, sees arbitrary bodies without the fuzzer having to
    // find the header first.
    if let Some((&kind, body)) = data.split_first() {
        let version = u8::try_from(PROTOCOL_VERSION).expect("the version is a one-byte varint");
        let mut payload = vec![version, kind % 10];
        payload.extend_from_slice(body);
        decode_all(&payload);
    }
    // The ruleset decoders (a device verifies the signature first, but a coordinator's
    // stored file and the payload parser still see whatever bytes they are given).
    if let Ok(signed) = rules::SignedRuleset::from_bytes(data) {
        let bytes = signed.to_bytes().expect("a decoded signed ruleset encodes");
        let again = rules::SignedRuleset::from_bytes(&bytes).expect("a re-encoded signed ruleset decodes");
        assert_eq!(again.to_bytes().expect("encodes"), bytes);
    }
    let _ = rules::Ruleset::from_payload(data);
});

/// Every decoder on `data`, for each shape; whatever decodes must re-encode to the same
/// bytes, and goes through every conversion.
fn decode_all(data: &[u8]) {
    for shape in &SHAPES {
        let limits = Limits::for_shape(shape);
        if let Ok(request) = wire::decode_request(data, &limits) {
            let payload = reencode(&request);
            let again = wire::decode_request(&payload, &limits).expect("a re-encoded request decodes");
            assert_eq!(reencode(&again), payload);
            let layout = shape.layout();
            match request {
                Request::Upload(upload) => drop(upload.verify(&layout, 1.0)),
                Request::AdvertiseKeys(m) => drop(m.into_client_message()),
                Request::EncryptedShares(m) => drop(m.into_client_message()),
                Request::MaskedInput(m) => drop(m.into_client_message(&layout)),
                Request::UnmaskShares(m) => drop(m.into_client_message()),
                Request::CheckIn(_) | Request::FetchRules(_) => {}
            }
        }
        if let Ok(response) = wire::decode_response(data, &limits) {
            let payload = reencode(&response);
            let again = wire::decode_response(&payload, &limits).expect("a re-encoded response decodes");
            assert_eq!(reencode(&again), payload);
            let cached = cached_model(shape);
            let _ = response.clone().into_inbound(Some(&cached));
            let _: Result<_, _> = Response::into_inbound(response, None);
        }
    }
}

/// The payload of a decoded message, encoded again.
fn reencode<M: wire::Message>(msg: &M) -> Vec<u8> {
    let frame = wire::encode(msg).expect("whatever decodes encodes");
    frame[LEN_PREFIX..].to_vec()
}

/// A cached model of version 0 with `shape`, all zeros (built through the wire type, which
/// spares this crate a dependency on ndarray).
fn cached_model(shape: &ModelShape) -> Arc<RoundModel> {
    let model = wire::WireModel {
        version: 0,
        n_items: shape.n_items as u64,
        dim: shape.dim as u64,
        n_segments: shape.n_segments as u64,
        item_factors: vec![0.0; shape.n_items * shape.dim],
        item_bias: vec![0.0; shape.n_items],
        global_mean: 0.0,
        centroids: vec![0.0; shape.n_segments * shape.dim],
    };
    Arc::new(RoundModel::try_from(model).expect("a valid model"))
}
