//! The test control plane's certificates: one CA that signs the apiserver's serving
//! certificate and the admin client certificate (`O=system:masters`), plus a
//! service-account signing key pair. Written as PEM files into the cluster directory.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Paths of the PEM files written by [`write`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_public: PathBuf,
    pub sa_private: PathBuf,
}

/// Generates the certificates and keys into `dir`.
pub fn write(dir: &Path) -> Result<Pki, String> {
    let err = |what: &str, e: rcgen::Error| format!("failed to generate {what}: {e}");
    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_public: dir.join("sa.pub"),
        sa_private: dir.join("sa.key"),
    };

    let (ca_cert, issuer) = new_ca("sluice-test-ca").map_err(|e| err("CA", e))?;

    // The IP SAN matters: rustls (kube-rs) checks it for https://127.0.0.1 URLs. 10.0.0.1
    // is the `kubernetes` Service IP of the service range below.
    let serving_key = KeyPair::generate().map_err(|e| err("serving key", e))?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .map_err(|e| err("serving certificate", e))?;
    for ip in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(10, 0, 0, 1)] {
        serving
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(ip)));
    }
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving
        .signed_by(&serving_key, &issuer)
        .map_err(|e| err("serving certificate", e))?;

    let admin_key = KeyPair::generate().map_err(|e| err("admin key", e))?;
    let mut admin = CertificateParams::new(Vec::<String>::new()).map_err(|e| err("admin", e))?;
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin
        .signed_by(&admin_key, &issuer)
        .map_err(|e| err("admin certificate", e))?;

    let sa_key = KeyPair::generate().map_err(|e| err("service-account key", e))?;

    let files = [
        (&pki.ca_cert, ca_cert.pem()),
        (&pki.serving_cert, serving_cert.pem()),
        (&pki.serving_key, serving_key.serialize_pem()),
        (&pki.admin_cert, admin_cert.pem()),
        (&pki.admin_key, admin_key.serialize_pem()),
        (&pki.sa_public, sa_key.public_key_pem()),
        (&pki.sa_private, sa_key.serialize_pem()),
    ];
    for (path, pem) in files {
        std::fs::write(path, pem)
            .map_err(|e| format!("failed to write {}: {e}", path.display()))?;
    }
    Ok(pki)
}

/// A throw-away CA and a serving certificate for 127.0.0.1 signed by it, as PEM:
/// `(ca, certificate, key)`. Used by the https git server.
pub fn serving_cert_pem() -> Result<(String, String, String), String> {
    let err = |e: rcgen::Error| format!("failed to generate the git server certificate: {e}");
    let (ca_cert, issuer) = new_ca("sluice-test-git-ca").map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(err)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// A self-signed CA certificate and the issuer that signs with it.
fn new_ca(
    common_name: &str,
) -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((cert, Issuer::new(params, key)))
}
