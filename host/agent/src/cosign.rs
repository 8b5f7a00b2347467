//! Cosign signatures of OCI artifacts, verified with public keys and offline: no
//! transparency log, no certificate authority, no network beyond the registry that holds
//! the artifact.
//!
//! Both ways `cosign sign --key` stores a signature are read:
//!
//! - the sigstore bundle (cosign v3's default): a manifest whose `subject` is the artifact,
//!   found through the OCI referrers API or, on registries without it, the referrers tag
//!   `sha256-<hex>` (an index); its layer is a bundle
//!   (`application/vnd.dev.sigstore.bundle.v0.3+json`) holding a DSSE envelope whose
//!   in-toto statement names the artifact's digest as its subject;
//! - the legacy `.sig` tag (`sha256-<hex>.sig`): layers
//!   `application/vnd.dev.cosign.simplesigning.v1+json`, each a payload naming the
//!   artifact's digest, signed in the annotation `dev.cosignproject.cosign/signature`.
//!
//! A signature counts when one of the keys verifies it (ECDSA P-256 with SHA-256, what
//! `cosign generate-key-pair` makes) and its payload names the artifact's digest: a valid
//! signature of another artifact copied beside this one does not count. Keyless
//! verification (Fulcio certificates, Rekor inclusion) is out of scope.
//!
//! Why not the `sigstore` crate: its `cosign` feature brings OIDC, Fulcio and Rekor
//! clients, a second OCI client and a second TLS crypto provider (aws-lc-rs or OpenSSL) for
//! what is, key-based and offline, one ECDSA check of one payload; `p256` does that check.

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;

/// The media type of a sigstore bundle (v0.3).
pub const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The media type of a legacy cosign signature layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding a legacy signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// Named public keys: a signature must verify with one of them.
#[derive(Clone)]
pub struct Keys(Vec<(String, VerifyingKey)>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Keys {
    /// Reads PEM public keys (`name`, contents), e.g. a Secret's keys ending `.pub`
    /// (Flux's convention).
    ///
    /// # Errors
    /// A key that is not a PEM ECDSA P-256 public key, named.
    pub fn parse<'a>(keys: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Keys, String> {
        let mut out = Vec::new();
        for (name, pem) in keys {
            let text = std::str::from_utf8(pem).map_err(|_| format!("{name}: not PEM"))?;
            let key = VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| {
                format!("{name}: not an ECDSA P-256 public key (cosign generate-key-pair): {e}")
            })?;
            out.push((name.to_string(), key));
        }
        Ok(Keys(out))
    }

    /// The keys' names.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A fixed digest of the key set, for a cached verdict.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        for (_, k) in &self.0 {
            h.update(k.to_encoded_point(true).as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The name of the key that verifies `signature` (DER or fixed-size) over `message`.
    fn verifies(&self, message: &[u8], signature: &[u8]) -> Option<&str> {
        let sig = Signature::from_der(signature)
            .or_else(|_| Signature::from_slice(signature))
            .ok()?;
        self.0
            .iter()
            .find(|(_, k)| k.verify(message, &sig).is_ok())
            .map(|(n, _)| n.as_str())
    }
}

/// What a signature payload says it signed, and whether the keys verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by this key, for this digest.
    Signed(String),
    /// Not by any of the keys.
    OtherKey,
    /// By a key, but for another artifact.
    OtherDigest(String),
    /// Not a signature sluice reads.
    Malformed(String),
}

/// A legacy signature: `payload` (the simple-signing JSON) and the annotation's base64
/// signature, checked against `digest` (`sha256:…`).
pub fn check_simple_signing(
    keys: &Keys,
    digest: &str,
    payload: &[u8],
    signature_b64: &str,
) -> Verdict {
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature_b64.trim()) else {
        return Verdict::Malformed("the signature is not base64".into());
    };
    let Some(key) = keys.verifies(payload, &sig) else {
        return Verdict::OtherKey;
    };
    let v: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return Verdict::Malformed(format!("payload: {e}")),
    };
    let signed = v["critical"]["image"]["docker-manifest-digest"]
        .as_str()
        .unwrap_or_default();
    if signed != digest {
        return Verdict::OtherDigest(signed.to_string());
    }
    Verdict::Signed(key.to_string())
}

/// A sigstore bundle's DSSE envelope, checked against `digest` (`sha256:…`): the
/// signature over DSSE's pre-authentication encoding, and the in-toto statement's subject.
pub fn check_bundle(keys: &Keys, digest: &str, bundle: &[u8]) -> Verdict {
    let b64 = base64::engine::general_purpose::STANDARD;
    let v: serde_json::Value = match serde_json::from_slice(bundle) {
        Ok(v) => v,
        Err(e) => return Verdict::Malformed(format!("bundle: {e}")),
    };
    let envelope = &v["dsseEnvelope"];
    let (Some(payload_type), Some(payload)) = (
        envelope["payloadType"].as_str(),
        envelope["payload"].as_str(),
    ) else {
        return Verdict::Malformed(
            "the bundle holds no DSSE envelope (a message signature is not an image signature)"
                .into(),
        );
    };
    let Ok(payload) = b64.decode(payload) else {
        return Verdict::Malformed("the payload is not base64".into());
    };
    let pae = [
        format!(
            "DSSEv1 {} {payload_type} {} ",
            payload_type.len(),
            payload.len()
        )
        .into_bytes(),
        payload.clone(),
    ]
    .concat();
    let signer = envelope["signatures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| b64.decode(s["sig"].as_str()?).ok())
        .find_map(|sig| keys.verifies(&pae, &sig));
    let Some(key) = signer else {
        return Verdict::OtherKey;
    };
    let statement: serde_json::Value = match serde_json::from_slice(&payload) {
        Ok(v) => v,
        Err(e) => return Verdict::Malformed(format!("statement: {e}")),
    };
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let subjects: Vec<&str> = statement["subject"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["digest"]["sha256"].as_str())
        .collect();
    if !subjects.contains(&hex) {
        return Verdict::OtherDigest(
            subjects
                .first()
                .map(|s| format!("sha256:{s}"))
                .unwrap_or_default(),
        );
    }
    Verdict::Signed(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;

    fn key(seed: u8) -> (SigningKey, String) {
        let sk = SigningKey::from_bytes(&[seed; 32].into()).expect("key");
        let pem = sk
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("pem");
        (sk, pem)
    }

    const DIGEST: &str = "sha256:8a38c2b93b1b663e3c4b881dc7536a48d211dfdcc88a58c168c42a4026450d87";

    #[test]
    fn a_legacy_signature_counts_for_its_digest_and_key_only() {
        let (sk, pem) = key(1);
        let (_, other) = key(2);
        let keys = Keys::parse([("cosign.pub", pem.as_bytes())]).expect("keys");
        let payload = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"r/app"}},"image":{{"docker-manifest-digest":"{DIGEST}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        let sig: Signature = sk.sign(payload.as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes());
        assert_eq!(
            check_simple_signing(&keys, DIGEST, payload.as_bytes(), &b64),
            Verdict::Signed("cosign.pub".into())
        );
        let elsewhere = DIGEST.replace("8a38", "0000");
        assert_eq!(
            check_simple_signing(&keys, &elsewhere, payload.as_bytes(), &b64),
            Verdict::OtherDigest(DIGEST.into())
        );
        let others = Keys::parse([("other.pub", other.as_bytes())]).expect("keys");
        assert_eq!(
            check_simple_signing(&others, DIGEST, payload.as_bytes(), &b64),
            Verdict::OtherKey
        );
        let tampered = payload.replace("r/app", "r/evil");
        assert_eq!(
            check_simple_signing(&keys, DIGEST, tampered.as_bytes(), &b64),
            Verdict::OtherKey
        );
    }

    #[test]
    fn a_bundle_counts_for_its_statements_subject_and_key_only() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (sk, pem) = key(3);
        let keys = Keys::parse([("team.pub", pem.as_bytes())]).expect("keys");
        let hex = DIGEST.trim_start_matches("sha256:");
        let statement = format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"{hex}"}}}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{{}}}}"#
        );
        let t = "application/vnd.in-toto+json";
        let pae = format!("DSSEv1 {} {t} {} {statement}", t.len(), statement.len());
        let sig: Signature = sk.sign(pae.as_bytes());
        let bundle = serde_json::json!({
            "mediaType": BUNDLE,
            "verificationMaterial": {"publicKey": {"hint": "x"}},
            "dsseEnvelope": {
                "payload": b64.encode(&statement),
                "payloadType": t,
                "signatures": [{"sig": b64.encode(sig.to_der().as_bytes())}]
            }
        })
        .to_string();
        assert_eq!(
            check_bundle(&keys, DIGEST, bundle.as_bytes()),
            Verdict::Signed("team.pub".into())
        );
        assert!(matches!(
            check_bundle(&keys, &DIGEST.replace("8a38", "0000"), bundle.as_bytes()),
            Verdict::OtherDigest(_)
        ));
        let (_, other) = key(4);
        let others = Keys::parse([("other.pub", other.as_bytes())]).expect("keys");
        assert_eq!(
            check_bundle(&others, DIGEST, bundle.as_bytes()),
            Verdict::OtherKey
        );
        assert!(matches!(
            check_bundle(&keys, DIGEST, br#"{"messageSignature": {}}"#),
            Verdict::Malformed(_)
        ));
        assert!(
            Keys::parse([("bad.pub", b"not a key".as_slice())])
                .unwrap_err()
                .starts_with("bad.pub: ")
        );
    }
}
