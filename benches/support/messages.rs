//! Client messages and frames shared by the micro-benchmarks and the allocation counts.

/// A JSON object payload of exactly `len` bytes: `{"d":"xxx…"}`.
pub(crate) fn payload(len: usize) -> Vec<u8> {
    assert!(len >= 8, "payload too short for the wrapper");
    let mut out = b"{\"d\":\"".to_vec();
    out.resize(len - 2, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// A P2P `data_request` with a pid, carrying `payload`.
pub(crate) fn p2p_message(payload: &[u8]) -> Vec<u8> {
    let mut out = br#"{"pid":"c-000042","type":"data_request","targetUserId":12345,"payload":"#.to_vec();
    out.extend_from_slice(payload);
    out.push(b'}');
    out
}

/// A masked client text frame (FIN + text) carrying `body`.
pub(crate) fn masked_text_frame(body: &[u8]) -> Vec<u8> {
    customws::ws::frame::masked_frame(0x81, body, [0x37, 0xfa, 0x21, 0x3d])
}
