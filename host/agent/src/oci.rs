//! OCI artifacts as sources: manifests that CI built and pushed to a registry, pinned by
//! digest.
//!
//! The format is Flux's, so what `flux push artifact` writes (GitLab's advice since agentk
//! lost GitOps) syncs unchanged: an OCI image manifest whose one layer is a tar+gzip of the
//! manifests (`application/vnd.cncf.flux.content.v1.tar+gzip`; without one, the first `…tar+gzip`
//! layer, source-controller's default), with
//! the annotations `org.opencontainers.image.source`, `.revision` and `.created`.
//!
//! A [`Source`] whose URL starts `oci://` is one of these: [`resolve`] turns a tag, a
//! semver range or a digest into the manifest's digest (one HEAD request for a tag), and
//! [`fetch`] reads the artifact of a digest into a [`Snapshot`], from the cache when it is
//! there (manifests and layers are kept by digest, verified, so a registry that is down
//! does not stop a project whose digest was fetched once). From there the files take the
//! same path as a commit's: select, render, decode.
//!
//! Extraction is bounded and refuses what could reach outside the artifact: absolute paths
//! and `..`, hard links to anything but an earlier file of the archive, devices and FIFOs
//! (the hard-link traversal of oras-go's advisory GHSA-2c8p-5f26-3mw3 included). Symbolic
//! links are listed as such and, as in git, never followed.
//!
//! Like [`Source`]'s git side, these functions block: call them off the async workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

use crate::config::GitRef;
use crate::source::{EntryKind, Error, Result, Snapshot, Source, TreeEntry};

/// The layer `flux push artifact` writes.
pub const FLUX_CONTENT: &str = "application/vnd.cncf.flux.content.v1.tar+gzip";
/// The config `flux push artifact` writes.
pub const FLUX_CONFIG: &str = "application/vnd.cncf.flux.config.v1+json";
/// The annotation naming the git revision an artifact was built from.
pub const REVISION: &str = "org.opencontainers.image.revision";
/// The annotation naming the repository an artifact was built from.
pub const SOURCE: &str = "org.opencontainers.image.source";

/// The tag followed when a project names none (`ref:` absent).
pub const DEFAULT_TAG: &str = "latest";
/// Most bytes a layer may have as downloaded (compressed).
pub const MAX_LAYER_BYTES: u64 = 64 << 20;
/// Most bytes an artifact may have unpacked, all files together.
pub const MAX_UNPACKED_BYTES: u64 = 128 << 20;
/// Most entries an artifact's archive may have.
pub const MAX_ENTRIES: usize = 20_000;
/// Most bytes a manifest may have.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most tags read to resolve a semver range.
const MAX_TAGS: usize = 100_000;
/// The deadline of one registry request (a layer's download has the fetch's own).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent reaches registries, beyond a project's own credentials.
#[derive(Debug, Clone, Default)]
pub struct Registries {
    /// A Docker `config.json`: the `.dockerconfigjson` of a `kubernetes.io/dockerconfigjson`
    /// Secret, the one image pulls use (`--registry-config`). Read at every request, so a
    /// rotated Secret is used without a restart.
    pub config_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) per registry host (`--registry-ca HOST=FILE`).
    pub ca: HashMap<String, Vec<u8>>,
    /// Registry hosts spoken to over plain HTTP (`--insecure-registry HOST`); every other
    /// one over https only.
    pub plain_http: HashSet<String>,
}

impl Registries {
    /// `source` set up for its registry: the host's CA, plain HTTP if named, and the
    /// Docker config for credentials.
    #[must_use]
    pub fn configure(&self, source: Source) -> Source {
        let Some((host, _)) = parse_url(source.url()) else {
            return source;
        };
        let mut source = match self.ca.get(&host) {
            Some(pem) => source.with_ca(pem.clone()),
            None => source,
        };
        if self.plain_http.contains(&host) {
            source = source.with_plain_http();
        }
        match &self.config_file {
            Some(f) => source.with_registry_config(f.clone()),
            None => source,
        }
    }
}

/// The credentials a Docker `config.json` holds for `host` (`auths` keyed by host, by
/// `https://host` or by `https://host/v1/`; `username` and `password`, or `auth` as base64
/// of `user:password`).
pub fn docker_credentials(json: &[u8], host: &str) -> Option<crate::source::Credentials> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let auths = v["auths"].as_object()?;
    let key = |k: &str| -> String {
        let k = k.split_once("://").map_or(k, |(_, rest)| rest);
        k.split('/').next().unwrap_or(k).to_ascii_lowercase()
    };
    let (_, entry) = auths
        .iter()
        .find(|(k, _)| key(k) == host.to_ascii_lowercase())?;
    if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Some(crate::source::Credentials {
            username: u.into(),
            password: p.into(),
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?)
        .ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(crate::source::Credentials {
        username: u.into(),
        password: p.into(),
    })
}

/// `oci://host[:port]/repository` → (registry, repository).
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("oci://")?;
    let (registry, repository) = rest.split_once('/')?;
    if registry.is_empty() || repository.is_empty() || repository.contains(['@', ':']) {
        return None;
    }
    Some((
        registry.to_string(),
        repository.trim_end_matches('/').to_string(),
    ))
}

/// The digest `git_ref` names now: a digest as given, a tag's (the default branch is
/// [`DEFAULT_TAG`]) from one HEAD request, the highest tag a semver range accepts.
///
/// # Errors
/// [`Error::ListRefs`] when the registry cannot be asked, [`Error::RefNotFound`] when the
/// tag is not there or no tag fits the range.
pub fn resolve(source: &Source, git_ref: &GitRef) -> Result<String> {
    let url = source.url().to_string();
    let list_err = |message: String| Error::ListRefs {
        url: url.clone(),
        message,
    };
    let (registry, repository) = parse_url(&url).ok_or_else(|| list_err(bad_url()))?;
    let tag = match git_ref {
        GitRef::Commit(digest) => return Ok(digest.clone()),
        GitRef::DefaultBranch => DEFAULT_TAG.to_string(),
        GitRef::Tag(t) => t.clone(),
        GitRef::Branch(b) => {
            return Err(list_err(format!(
                "an OCI repository has tags and digests, not branches (branch {b:?})"
            )));
        }
        GitRef::Semver(range) => {
            let (client, auth) = client(source);
            let image = Reference::with_tag(registry.clone(), repository.clone(), "latest".into());
            let tags = block_on(list_tags(&client, &image, &auth)).map_err(list_err)?;
            highest(range, &tags)
                .map_err(list_err)?
                .ok_or_else(|| Error::RefNotFound {
                    url: url.clone(),
                    git_ref: format!("semver {range} (of {} tags)", tags.len()),
                })?
        }
    };
    let (client, auth) = client(source);
    let image = Reference::with_tag(registry, repository, tag.clone());
    block_on(async {
        tokio::time::timeout(REQUEST_TIMEOUT, client.fetch_manifest_digest(&image, &auth))
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())
    })
    .map_err(|message| {
        if message.contains("MANIFEST_UNKNOWN") || message.contains("404") {
            Error::RefNotFound {
                url: url.clone(),
                git_ref: format!("tag {tag}"),
            }
        } else {
            list_err(message)
        }
    })
}

/// The files of the artifact `digest`, from the cache or the registry, and its revision
/// annotation. The layer read is Flux's, else the first tar+gzip one. Stops downloading when
/// `interrupt` becomes true.
///
/// # Errors
/// [`Error::Fetch`] when the registry fails, [`Error::Read`] when the artifact is not one
/// sluice reads (no layer of the type, a digest that does not match, an entry it refuses).
pub fn fetch(source: &Source, digest: &str, interrupt: &AtomicBool) -> Result<Snapshot> {
    let read_err = |message: String| Error::Read {
        url: source.url().to_string(),
        commit: digest.to_string(),
        message,
    };
    let manifest = manifest(source, digest)?;
    if let Some(keys) = source.keys() {
        let how = verify(source, digest, keys).map_err(|message| Error::Unverified {
            url: source.url().to_string(),
            message,
        })?;
        tracing::debug!(url = %source.url(), digest, verified = %how, "artifact signature verified");
    }
    let chosen = pick_layer(&manifest.layers).map_err(read_err)?.clone();
    let gz = blob(source, digest, &chosen, MAX_LAYER_BYTES, interrupt)?;
    let (entries, blobs) = unpack(&gz).map_err(read_err)?;
    let revision = manifest
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .cloned();
    Ok(Snapshot::artifact(
        digest.to_string(),
        revision,
        entries,
        blobs,
    ))
}

/// The image manifest `digest` of the source's repository, from the cache (kept by digest)
/// or the registry, verified against its digest.
fn manifest(source: &Source, digest: &str) -> Result<OciImageManifest> {
    let url = source.url().to_string();
    let read_err = |message: String| Error::Read {
        url: url.clone(),
        commit: digest.to_string(),
        message,
    };
    let hex = digest_hex(digest).ok_or_else(|| {
        read_err("not a digest (expected sha256: and 64 hexadecimal digits)".into())
    })?;
    let cache = Cache::new(source.cache_dir());
    let bytes = match cache.get("manifests", hex) {
        Some(bytes) => bytes,
        None => {
            let image = reference(source, digest)?;
            let (client, auth) = client(source);
            let bytes = block_on(async {
                let pull = client.pull_manifest_raw(&image, &auth, &[MANIFEST_TYPES]);
                tokio::time::timeout(REQUEST_TIMEOUT, pull)
                    .await
                    .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
                    .map(|(bytes, _)| bytes.to_vec())
                    .map_err(|e| e.to_string())
            })
            .map_err(|message| Error::Fetch {
                url: url.clone(),
                message,
            })?;
            if bytes.len() > MAX_MANIFEST_BYTES || sha256_hex(&bytes) != hex {
                return Err(read_err("the manifest does not match its digest".into()));
            }
            cache.put("manifests", hex, &bytes).map_err(read_err)?;
            bytes
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| read_err(format!("not an OCI image manifest: {e}")))
}

/// The blob `layer` of the artifact `digest`, from the cache (kept by digest) or the
/// registry, at most `max` bytes, verified against its digest.
fn blob(
    source: &Source,
    digest: &str,
    layer: &OciDescriptor,
    max: u64,
    interrupt: &AtomicBool,
) -> Result<Vec<u8>> {
    let read_err = |message: String| Error::Read {
        url: source.url().to_string(),
        commit: digest.to_string(),
        message,
    };
    let hex = digest_hex(&layer.digest)
        .ok_or_else(|| read_err(format!("layer digest {:?} is not sha256", layer.digest)))?;
    if u64::try_from(layer.size).unwrap_or(u64::MAX) > max {
        return Err(read_err(format!(
            "its layer has {} bytes; at most {max} are read",
            layer.size
        )));
    }
    let cache = Cache::new(source.cache_dir());
    if let Some(bytes) = cache.get("blobs", hex) {
        return Ok(bytes);
    }
    let image = reference(source, digest)?;
    let (client, auth) = client(source);
    let bytes =
        block_on(download(&client, &auth, &image, layer, max, interrupt)).map_err(|message| {
            Error::Fetch {
                url: source.url().to_string(),
                message,
            }
        })?;
    if sha256_hex(&bytes) != hex {
        return Err(read_err("the layer does not match its digest".into()));
    }
    cache.put("blobs", hex, &bytes).map_err(read_err)?;
    Ok(bytes)
}

fn reference(source: &Source, digest: &str) -> Result<Reference> {
    let (registry, repository) = parse_url(source.url()).ok_or_else(|| Error::Fetch {
        url: source.url().to_string(),
        message: bad_url(),
    })?;
    Ok(Reference::with_digest(
        registry,
        repository,
        digest.to_string(),
    ))
}

/// A plugin module named by OCI reference (`oci://host/repo:tag@sha256:…`, a tag, a digest
/// or both): the Wasm OCI artifact convention (config `application/vnd.wasm.config.v0+json`
/// or `v1`, one layer `application/vnd.wasm.content.layer.v1+wasm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRef {
    /// `oci://host/repository`.
    pub repository: String,
    /// The tag, if named.
    pub tag: Option<String>,
    /// The manifest digest, if named: then nothing is resolved.
    pub digest: Option<String>,
}

/// The config media types of a Wasm module artifact.
pub const WASM_CONFIGS: [&str; 2] = [
    "application/vnd.wasm.config.v0+json",
    "application/vnd.wasm.config.v1+json",
];
/// The layer media type of a Wasm module artifact.
pub const WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// The largest module pulled.
pub const MAX_MODULE_BYTES: u64 = 100 << 20;

impl ModuleRef {
    /// Reads `oci://host/repo[:tag][@sha256:…]`.
    ///
    /// # Errors
    /// A reference without tag or digest, or with a malformed digest.
    pub fn parse(reference: &str) -> std::result::Result<ModuleRef, String> {
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) if is_digest(d) => (n, Some(d.to_string())),
            Some((_, d)) => return Err(format!("{reference}: {d:?} is not a sha256 digest")),
            None => (reference, None),
        };
        let slash = name.rfind('/').unwrap_or(0);
        let (repository, tag) = match name[slash..].find(':') {
            Some(i) => (&name[..slash + i], Some(name[slash + i + 1..].to_string())),
            None => (name, None),
        };
        if parse_url(repository).is_none() {
            return Err(format!("{reference}: not oci://host/repository"));
        }
        if tag.is_none() && digest.is_none() {
            return Err(format!(
                "{reference}: name a tag (:v1) or a digest (@sha256:…)"
            ));
        }
        Ok(ModuleRef {
            repository: repository.to_string(),
            tag,
            digest,
        })
    }
}

/// A module pulled from a registry.
#[derive(Debug, Clone)]
pub struct Module {
    /// The module.
    pub bytes: Vec<u8>,
    /// Its artifact's manifest digest.
    pub digest: String,
    /// The manifest's annotations (`sluice plugin push` writes the world, the WIT
    /// version and the imports).
    pub annotations: BTreeMap<String, String>,
}

/// Pulls the module `r` through `source` (a source for `r.repository`, which carries its
/// registry's credentials and CA): the digest named, else the tag's, else (registry down)
/// the digest the tag last had. A module already held for a digest is never pulled again.
/// Returns the module and its manifest digest.
///
/// # Errors
/// The registry's, an artifact that is not a Wasm module, a digest that does not match.
pub fn pull_module(source: &Source, r: &ModuleRef) -> std::result::Result<Module, String> {
    let cache = Cache::new(source.cache_dir());
    let tag_key = r
        .tag
        .as_ref()
        .map(|t| sha256_hex(format!("{}:{t}", r.repository).as_bytes()));
    let digest = match (&r.digest, &r.tag) {
        (Some(d), _) => d.clone(),
        (None, Some(tag)) => match resolve(source, &GitRef::Tag(tag.clone())) {
            Ok(d) => {
                if let Some(k) = &tag_key {
                    let _ = cache.put("tags", k, d.as_bytes());
                }
                d
            }
            Err(e) => {
                // A registry that is down does not stop an agent whose modules are held.
                let held = tag_key
                    .as_ref()
                    .and_then(|k| std::fs::read(source.cache_dir().join("tags").join(k)).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .filter(|d| is_digest(d));
                match held {
                    Some(d) => {
                        tracing::warn!(module = %r.repository, tag = %tag, digest = %d, error = %e, "registry unreachable; using the digest the tag last had");
                        d
                    }
                    None => return Err(e.to_string()),
                }
            }
        },
        (None, None) => return Err(format!("{}: no tag or digest", r.repository)),
    };
    let manifest = manifest(source, &digest).map_err(|e| e.to_string())?;
    let config = manifest.config.media_type.as_str();
    if !WASM_CONFIGS.contains(&config) {
        return Err(format!(
            "{}@{digest}: not a Wasm module artifact (config {config}; expected {})",
            r.repository,
            WASM_CONFIGS.join(" or ")
        ));
    }
    let layer = match manifest.layers.as_slice() {
        [l] if l.media_type == WASM_LAYER => l,
        _ => {
            return Err(format!(
                "{}@{digest}: a Wasm module artifact has one layer of type {WASM_LAYER}",
                r.repository
            ));
        }
    };
    let bytes = blob(
        source,
        &digest,
        layer,
        MAX_MODULE_BYTES,
        &AtomicBool::new(false),
    )
    .map_err(|e| e.to_string())?;
    Ok(Module {
        bytes,
        digest,
        annotations: manifest.annotations.clone().unwrap_or_default(),
    })
}

/// The annotation `sluice plugin push` gives the plugin's world.
pub const ANNOTATION_WORLD: &str = "dev.sluice.plugin.world";
/// The annotation giving the `sluice:plugin` WIT version it was built against.
pub const ANNOTATION_WIT: &str = "dev.sluice.plugin.wit-version";
/// The annotation listing the interfaces it imports (what it asks for, capabilities
/// included).
pub const ANNOTATION_IMPORTS: &str = "dev.sluice.plugin.imports";

/// Publishes `module` as `oci://host/repo:tag` in the Wasm OCI artifact convention (config
/// `application/vnd.wasm.config.v0+json`, one `application/vnd.wasm.content.layer.v1+wasm`
/// layer) with `annotations` on the manifest; returns the manifest digest.
///
/// # Errors
/// The registry's.
pub async fn push_module(
    source: &Source,
    tag: &str,
    module: Vec<u8>,
    os: &str,
    annotations: BTreeMap<String, String>,
) -> std::result::Result<String, String> {
    use oci_client::client::{Config, ImageLayer};
    let (registry, repository) = parse_url(source.url()).ok_or_else(bad_url)?;
    let image = Reference::with_tag(registry, repository, tag.to_string());
    let layer_digest = format!("sha256:{}", sha256_hex(&module));
    let config = serde_json::json!({
        "architecture": "wasm",
        "os": os,
        "layerDigests": [layer_digest],
    });
    let layers = [ImageLayer::new(module, WASM_LAYER.to_string(), None)];
    let config = Config::new(
        serde_json::to_vec(&config).unwrap_or_default(),
        WASM_CONFIGS[0].to_string(),
        None,
    );
    let manifest = OciImageManifest::build(&layers, &config, Some(annotations));
    let (client, auth) = client(source);
    let push = client.push(&image, &layers, config, &auth, Some(manifest));
    tokio::time::timeout(Duration::from_secs(300), push)
        .await
        .map_err(|_| "the push took longer than 300 s".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(REQUEST_TIMEOUT, client.fetch_manifest_digest(&image, &auth))
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())
}

/// Verifies that `digest` of the source's repository carries a cosign signature by one of
/// `keys` ([`crate::cosign`]): a sigstore bundle among its referrers (the referrers API,
/// else the `sha256-<hex>` tag) or a legacy `sha256-<hex>.sig` tag. A digest verified once
/// with a key set is not asked again (the verdict is kept in the cache), so a registry
/// that is down does not stop a digest already verified. Returns which key signed, and how.
///
/// # Errors
/// No signature by these keys for this digest (naming the reference, the keys and what
/// was found), or the registry's.
pub fn verify(
    source: &Source,
    digest: &str,
    keys: &crate::cosign::Keys,
) -> std::result::Result<String, String> {
    use crate::cosign::{self, Verdict};
    let at = format!("{}@{digest}", source.url());
    let hex = digest_hex(digest).ok_or_else(|| format!("{at}: not a sha256 digest"))?;
    let cache = Cache::new(source.cache_dir());
    let verdict_key = sha256_hex(format!("{digest} {}", keys.fingerprint()).as_bytes());
    let marker = source.cache_dir().join("verified").join(&verdict_key);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        return Ok(text);
    }
    let (registry, repository) = parse_url(source.url()).ok_or_else(bad_url)?;
    let (client, auth) = client(source);
    let by_tag = |tag: String| Reference::with_tag(registry.clone(), repository.clone(), tag);
    let mut found: Vec<String> = Vec::new();
    let mut signed: Option<String> = None;

    // Sigstore bundles: the referrers API, else the referrers tag schema.
    let subject = Reference::with_digest(registry.clone(), repository.clone(), digest.into());
    let index = block_on(async {
        client
            .store_auth_if_needed(subject.resolve_registry(), &auth)
            .await;
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.pull_referrers(&subject, Some(cosign::BUNDLE)),
        )
        .await
        {
            Ok(Ok(index)) if !index.manifests.is_empty() => Ok(Some(
                index
                    .manifests
                    .into_iter()
                    .map(|m| (m.digest, m.artifact_type))
                    .collect::<Vec<_>>(),
            )),
            _ => {
                let raw =
                    get_raw(&client, &auth, &by_tag(format!("sha256-{hex}")), INDEX_TYPE).await?;
                Ok::<_, String>(raw.and_then(|bytes| {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
                    Some(
                        v["manifests"]
                            .as_array()?
                            .iter()
                            .filter_map(|m| {
                                Some((
                                    m["digest"].as_str()?.to_string(),
                                    m["artifactType"].as_str().map(str::to_string),
                                ))
                            })
                            .collect(),
                    )
                }))
            }
        }
    })
    .map_err(|e| format!("{at}: reading its signatures: {e}"))?;
    for (d, artifact_type) in index.unwrap_or_default() {
        if artifact_type.as_deref() != Some(cosign::BUNDLE) || signed.is_some() {
            continue;
        }
        let m = manifest(source, &d).map_err(|e| e.to_string())?;
        for layer in m.layers.iter().filter(|l| l.media_type == cosign::BUNDLE) {
            let bytes = blob(source, &d, layer, 1 << 20, &AtomicBool::new(false))
                .map_err(|e| e.to_string())?;
            match cosign::check_bundle(keys, digest, &bytes) {
                Verdict::Signed(k) => signed = Some(format!("sigstore bundle signed by {k}")),
                other => found.push(format!("a sigstore bundle: {}", describe(&other))),
            }
        }
    }

    // The legacy `.sig` tag.
    if signed.is_none() {
        let raw = block_on(get_raw(
            &client,
            &auth,
            &by_tag(format!("sha256-{hex}.sig")),
            MANIFEST_TYPES,
        ))
        .map_err(|e| format!("{at}: reading its signatures: {e}"))?;
        if let Some(bytes) = raw {
            let m: OciImageManifest = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{at}: its .sig manifest: {e}"))?;
            for layer in m
                .layers
                .iter()
                .filter(|l| l.media_type == cosign::SIMPLE_SIGNING)
            {
                let Some(sig) = layer
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(cosign::SIGNATURE_ANNOTATION))
                else {
                    continue;
                };
                let payload = blob(source, digest, layer, 1 << 20, &AtomicBool::new(false))
                    .map_err(|e| e.to_string())?;
                match cosign::check_simple_signing(keys, digest, &payload, sig) {
                    Verdict::Signed(k) => {
                        signed = Some(format!("cosign signature (.sig) by {k}"));
                        break;
                    }
                    other => found.push(format!("a .sig signature: {}", describe(&other))),
                }
            }
        }
    }
    match signed {
        Some(how) => {
            let _ = cache.put("verified", &verdict_key, how.as_bytes());
            Ok(how)
        }
        None => Err(format!(
            "{at}: no cosign signature by {} ({})",
            keys.names().join(", "),
            if found.is_empty() {
                "it has none: neither a sigstore bundle among its referrers nor a .sig tag"
                    .to_string()
            } else {
                format!("found {}", found.join("; "))
            }
        )),
    }
}

fn describe(v: &crate::cosign::Verdict) -> String {
    use crate::cosign::Verdict;
    match v {
        Verdict::Signed(k) => format!("signed by {k}"),
        Verdict::OtherKey => "signed by another key".into(),
        Verdict::OtherDigest(d) => format!("a signature of another artifact ({d})"),
        Verdict::Malformed(m) => format!("unreadable ({m})"),
    }
}

/// An OCI image index, as the referrers tag holds.
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// A manifest by tag, raw; `None` when the registry has no such tag.
async fn get_raw(
    client: &Client,
    auth: &RegistryAuth,
    image: &Reference,
    accept: &str,
) -> std::result::Result<Option<Vec<u8>>, String> {
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.pull_manifest_raw(image, auth, &[accept]),
    )
    .await
    {
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
        Ok(Ok((bytes, _))) if bytes.len() <= MAX_MANIFEST_BYTES => Ok(Some(bytes.to_vec())),
        Ok(Ok(_)) => Err("a manifest larger than 4 MiB".into()),
        Ok(Err(e)) => {
            let text = e.to_string();
            let lower = text.to_ascii_lowercase();
            if lower.contains("manifest unknown")
                || lower.contains("manifest_unknown")
                || lower.contains("not found")
                || lower.contains("404")
            {
                Ok(None)
            } else {
                Err(text)
            }
        }
    }
}

/// The manifest media types asked for: an OCI image manifest (an index is not an artifact).
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json";

fn bad_url() -> String {
    "not an OCI repository URL (expected oci://host/repository)".into()
}

/// The layer to read: Flux's, else the first tar+gzip layer (source-controller's rule).
fn pick_layer(layers: &[OciDescriptor]) -> std::result::Result<&OciDescriptor, String> {
    let found = layers
        .iter()
        .find(|l| l.media_type == FLUX_CONTENT)
        .or_else(|| layers.iter().find(|l| l.media_type.ends_with("tar+gzip")));
    found.ok_or_else(|| {
        let types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
        format!(
            "no layer of type …tar+gzip (it has {})",
            if types.is_empty() {
                "none".to_string()
            } else {
                types.join(", ")
            }
        )
    })
}

/// Downloads a layer, at most `max` bytes, each read within [`REQUEST_TIMEOUT`].
async fn download(
    client: &Client,
    auth: &RegistryAuth,
    image: &Reference,
    layer: &OciDescriptor,
    max: u64,
    interrupt: &AtomicBool,
) -> std::result::Result<Vec<u8>, String> {
    // Authenticates (a token for pulls) the way the manifest pull does.
    client
        .store_auth_if_needed(image.resolve_registry(), auth)
        .await;
    let mut stream = tokio::time::timeout(REQUEST_TIMEOUT, client.pull_blob_stream(image, layer))
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(usize::try_from(layer.size).unwrap_or(0).min(1 << 20));
    loop {
        if interrupt.load(Ordering::Relaxed) {
            return Err("interrupted".into());
        }
        let next = tokio::time::timeout(REQUEST_TIMEOUT, stream.stream.next())
            .await
            .map_err(|_| format!("the download stalled for {REQUEST_TIMEOUT:?}"))?;
        match next {
            None => return Ok(out),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(chunk)) => {
                out.extend_from_slice(&chunk);
                if out.len() as u64 > max {
                    return Err(format!("the layer is larger than {max} bytes"));
                }
            }
        }
    }
}

/// Reads a tar+gzip archive into tree entries and their contents, within the bounds of
/// the module doc. Directories are implied; the order is the archive's, then sorted.
pub fn unpack(gz: &[u8]) -> std::result::Result<(Vec<TreeEntry>, Vec<Vec<u8>>), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let mut files: BTreeMap<String, (EntryKind, Vec<u8>)> = BTreeMap::new();
    let mut total = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar+gzip archive: {e}"))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let mut entry = entry.map_err(|e| format!("not a tar+gzip archive: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("an entry's name is unreadable: {e}"))?
            .to_string_lossy()
            .into_owned();
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        // Directories are implied by their files (`flux push` writes `.` first); the rest
        // is metadata of the archive itself (pax headers are read by `tar`).
        if matches!(
            kind,
            T::Directory | T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            continue;
        }
        let path = clean(&raw)?;
        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                let size = entry.header().size().unwrap_or(u64::MAX);
                total = total.saturating_add(size);
                if total > MAX_UNPACKED_BYTES {
                    return Err(format!(
                        "its files have more than {MAX_UNPACKED_BYTES} bytes unpacked"
                    ));
                }
                let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                entry
                    .by_ref()
                    .take(size)
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("{path}: {e}"))?;
                files.insert(path, (EntryKind::File, bytes));
            }
            T::Symlink => {
                files.insert(path, (EntryKind::Symlink, link_target(&entry).into_bytes()));
            }
            T::Link => {
                let target =
                    clean(&link_target(&entry)).map_err(|e| format!("{path}: hard link: {e}"))?;
                match files.get(&target) {
                    Some((EntryKind::File, bytes)) => {
                        total = total.saturating_add(bytes.len() as u64);
                        if total > MAX_UNPACKED_BYTES {
                            return Err(format!(
                                "its files have more than {MAX_UNPACKED_BYTES} bytes unpacked"
                            ));
                        }
                        let bytes = bytes.clone();
                        files.insert(path, (EntryKind::File, bytes));
                    }
                    _ => {
                        return Err(format!(
                            "{path}: a hard link to {target:?}, which is not an earlier file of the artifact"
                        ));
                    }
                }
            }
            other => {
                return Err(format!(
                    "{path}: entries of type {other:?} (devices, FIFOs) are refused"
                ));
            }
        }
    }
    let mut entries = Vec::with_capacity(files.len());
    let mut blobs = Vec::with_capacity(files.len());
    for (i, (path, (kind, bytes))) in files.into_iter().enumerate() {
        entries.push(TreeEntry {
            path,
            kind,
            id: i.to_string(),
        });
        blobs.push(bytes);
    }
    Ok((entries, blobs))
}

/// Where a link entry points, as written.
fn link_target<R: Read>(entry: &tar::Entry<'_, R>) -> String {
    entry
        .link_name()
        .ok()
        .flatten()
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An archive path made relative and normal (`./a//b` is `a/b`); absolute paths and `..`
/// are refused.
fn clean(raw: &str) -> std::result::Result<String, String> {
    if raw.starts_with('/') {
        return Err(format!("{raw:?}: absolute paths are refused"));
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{raw:?}: paths with \"..\" are refused")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(format!("{raw:?}: an entry without a name"));
    }
    Ok(parts.join("/"))
}

/// The highest of `tags` (a leading `v` allowed) that `range` accepts. `range` is a semver
/// requirement; Flux's space-separated form (`>=1.0.0 <2.0.0`) reads as comma-separated.
pub fn highest(range: &str, tags: &[String]) -> std::result::Result<Option<String>, String> {
    let req = semver::VersionReq::parse(&comma_separated(range))
        .map_err(|e| format!("semver {range:?}: {e}"))?;
    Ok(tags
        .iter()
        .filter_map(|t| {
            let v = semver::Version::parse(t.strip_prefix('v').unwrap_or(t)).ok()?;
            req.matches(&v).then_some((v, t))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, t)| t.clone()))
}

/// `>=1.0.0 <2.0.0` → `>=1.0.0, <2.0.0`; `>= 1.0` stays one comparator.
fn comma_separated(range: &str) -> String {
    if range.contains(',') {
        return range.to_string();
    }
    let mut out: Vec<String> = Vec::new();
    let mut pending = String::new();
    for token in range.split_whitespace() {
        pending.push_str(token);
        if !token
            .chars()
            .all(|c| matches!(c, '<' | '>' | '=' | '~' | '^'))
        {
            out.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        out.push(pending);
    }
    out.join(", ")
}

async fn list_tags(
    client: &Client,
    image: &Reference,
    auth: &RegistryAuth,
) -> std::result::Result<Vec<String>, String> {
    let mut tags: Vec<String> = Vec::new();
    loop {
        let page = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.list_tags(image, auth, Some(1000), tags.last().map(String::as_str)),
        )
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        let n = page.tags.len();
        tags.extend(page.tags);
        if n < 1000 || tags.len() >= MAX_TAGS {
            return Ok(tags);
        }
    }
}

/// A client for the source's registry (its CA trusted) and the source's credentials.
fn client(source: &Source) -> (Client, RegistryAuth) {
    let config = ClientConfig {
        protocol: if source.plain_http() {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        extra_root_certificates: source
            .ca_pem()
            .map(|pem| {
                vec![Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.to_vec(),
                }]
            })
            .unwrap_or_default(),
        read_timeout: Some(REQUEST_TIMEOUT),
        connect_timeout: Some(Duration::from_secs(10)),
        ..ClientConfig::default()
    };
    let from_config = || {
        let (host, _) = parse_url(source.url())?;
        docker_credentials(&std::fs::read(source.registry_config()?).ok()?, &host)
    };
    let auth = match source.credentials().cloned().or_else(from_config) {
        Some(c) => RegistryAuth::Basic(c.username, c.password),
        None => RegistryAuth::Anonymous,
    };
    (Client::new(config), auth)
}

/// Runs `f` to completion from a blocking thread (the agent's, or a caller without one).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(f),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
            .block_on(f),
    }
}

fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Whether `digest` is one sluice accepts (`sha256:` and 64 hexadecimal digits).
pub fn is_digest(digest: &str) -> bool {
    digest_hex(digest).is_some()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Manifests and layers kept by digest under the source's cache directory; what is read
/// back is checked against its digest again, so a damaged file is fetched anew.
struct Cache {
    root: PathBuf,
}

impl Cache {
    fn new(root: &std::path::Path) -> Cache {
        Cache {
            root: root.to_path_buf(),
        }
    }

    fn get(&self, kind: &str, hex: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.root.join(kind).join(hex)).ok()?;
        (sha256_hex(&bytes) == hex).then_some(bytes)
    }

    fn put(&self, kind: &str, hex: &str, bytes: &[u8]) -> std::result::Result<(), String> {
        let dir = self.root.join(kind);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cache {}: {e}", dir.display()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)
            .map_err(|e| format!("cache {}: {e}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, bytes)
            .map_err(|e| format!("cache {}: {e}", dir.display()))?;
        tmp.persist(dir.join(hex))
            .map_err(|e| format!("cache {}: {e}", dir.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let tar = b.into_inner().expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).expect("gzip");
        gz.finish().expect("gzip")
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = header(tar::EntryType::Regular, body.len() as u64);
        b.append_data(&mut h, path, body).expect("append");
    }

    /// Writes a raw name (the `tar` builder refuses `..` itself, as a hostile one would not).
    fn raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: &str) {
        let mut h = header(kind, 0);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, std::io::empty()).expect("append");
    }

    #[test]
    fn files_symlinks_and_inner_hard_links_are_read() {
        let gz = archive(|b| {
            raw(b, tar::EntryType::Directory, ".", "");
            file(b, "./deploy/app.yaml", b"kind: ConfigMap\n");
            raw(
                b,
                tar::EntryType::Symlink,
                "deploy/link.yaml",
                "/etc/passwd",
            );
            raw(
                b,
                tar::EntryType::Link,
                "deploy/copy.yaml",
                "deploy/app.yaml",
            );
        });
        let (entries, blobs) = unpack(&gz).expect("unpacks");
        let listed: Vec<(&str, EntryKind)> =
            entries.iter().map(|e| (e.path.as_str(), e.kind)).collect();
        assert_eq!(
            listed,
            [
                ("deploy/app.yaml", EntryKind::File),
                ("deploy/copy.yaml", EntryKind::File),
                ("deploy/link.yaml", EntryKind::Symlink)
            ]
        );
        assert_eq!(blobs[1], b"kind: ConfigMap\n");
    }

    #[test]
    fn entries_reaching_outside_the_artifact_are_refused() {
        for (kind, name, link, expected) in [
            (
                tar::EntryType::Regular,
                "../x.yaml",
                "",
                "\"..\" are refused",
            ),
            (tar::EntryType::Regular, "/x.yaml", "", "absolute paths"),
            (
                tar::EntryType::Link,
                "x.yaml",
                "/etc/passwd",
                "absolute paths",
            ),
            (
                tar::EntryType::Link,
                "x.yaml",
                "../../etc/passwd",
                "\"..\" are refused",
            ),
            (
                tar::EntryType::Link,
                "x.yaml",
                "later.yaml",
                "not an earlier file",
            ),
            (tar::EntryType::Char, "tty", "", "devices, FIFOs"),
            (tar::EntryType::Fifo, "pipe", "", "devices, FIFOs"),
        ] {
            let gz = archive(|b| raw(b, kind, name, link));
            let e = unpack(&gz).expect_err(name);
            assert!(e.contains(expected), "{name}: {e}");
        }
        assert!(unpack(b"not gzip").unwrap_err().contains("not a tar+gzip"));
    }

    #[test]
    fn an_archive_larger_than_the_bound_unpacked_is_refused() {
        let gz = archive(|b| {
            let body = vec![b'a'; (MAX_UNPACKED_BYTES / 2 + 1) as usize];
            file(b, "a.yaml", &body);
            file(b, "b.yaml", &body);
        });
        assert!(gz.len() < 1 << 20, "compresses well: {}", gz.len());
        let e = unpack(&gz).unwrap_err();
        assert!(e.contains("bytes unpacked"), "{e}");
    }

    #[test]
    fn the_layer_is_flux_s_else_the_first_tar_gzip() {
        let layer = |t: &str| OciDescriptor {
            media_type: t.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            ..OciDescriptor::default()
        };
        let layers = [
            layer("application/vnd.example.readme"),
            layer("application/vnd.example.tar+gzip"),
            layer(FLUX_CONTENT),
        ];
        assert_eq!(pick_layer(&layers).unwrap().media_type, FLUX_CONTENT);
        assert_eq!(
            pick_layer(&layers[..2]).unwrap().media_type,
            "application/vnd.example.tar+gzip"
        );
        let e = pick_layer(&layers[..1]).unwrap_err();
        assert_eq!(
            e,
            "no layer of type …tar+gzip (it has application/vnd.example.readme)"
        );
    }

    #[test]
    fn semver_ranges_pick_the_highest_tag_they_accept() {
        let tags: Vec<String> = [
            "v1.0.0",
            "1.2.0",
            "v1.10.1",
            "2.0.0",
            "latest",
            "1.11.0-rc.1",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        assert_eq!(
            highest(">=1.0.0 <2.0.0", &tags).unwrap().as_deref(),
            Some("v1.10.1")
        );
        assert_eq!(highest("^1.2", &tags).unwrap().as_deref(), Some("v1.10.1"));
        assert_eq!(highest(">= 2", &tags).unwrap().as_deref(), Some("2.0.0"));
        assert_eq!(highest("~1.0", &tags).unwrap().as_deref(), Some("v1.0.0"));
        assert_eq!(highest(">=3", &tags).unwrap(), None);
        assert!(highest("not a range", &tags).is_err());
    }

    #[test]
    fn a_registry_gets_its_own_ca_plain_http_only_when_named_and_the_docker_config() {
        let r = Registries {
            config_file: Some("/etc/sluice/registry/config.json".into()),
            ca: [("reg.internal:5000".to_string(), b"PEM".to_vec())].into(),
            plain_http: ["lab.local".to_string()].into(),
        };
        let cache = std::path::Path::new("/tmp");
        let s = r.configure(Source::new("oci://reg.internal:5000/a/b", cache, None));
        assert_eq!(s.ca_pem(), Some(b"PEM".as_slice()));
        assert!(!s.plain_http());
        assert_eq!(
            s.registry_config(),
            Some(std::path::Path::new("/etc/sluice/registry/config.json"))
        );
        let s = r.configure(Source::new("oci://lab.local/a", cache, None));
        assert!(s.plain_http());
        assert_eq!(s.ca_pem(), None);
        // Another port of the same host is another registry.
        let s = r.configure(Source::new("oci://reg.internal:5001/a", cache, None));
        assert_eq!(s.ca_pem(), None);
    }

    #[test]
    fn docker_config_credentials_are_found_by_host() {
        let json = br#"{"auths": {
            "https://registry.gitlab.example/v1/": {"auth": "ZGVwbG95LXRva2VuOnMzY3JldDpwYXJ0"},
            "127.0.0.1:5000": {"username": "ci", "password": "pw"}
        }}"#;
        let c = docker_credentials(json, "registry.gitlab.example").expect("by URL key");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("deploy-token", "s3cret:part")
        );
        let c = docker_credentials(json, "127.0.0.1:5000").expect("by host key");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("ci", "pw"));
        assert!(docker_credentials(json, "127.0.0.1:5001").is_none());
        assert!(docker_credentials(b"not json", "x").is_none());
    }

    #[test]
    fn module_references_name_a_tag_a_digest_or_both() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ModuleRef::parse(&format!("oci://reg:5000/plugins/policy:v1@{d}")).unwrap();
        assert_eq!(
            r,
            ModuleRef {
                repository: "oci://reg:5000/plugins/policy".into(),
                tag: Some("v1".into()),
                digest: Some(d.clone())
            }
        );
        let r = ModuleRef::parse("oci://reg:5000/plugins/policy:v1").unwrap();
        assert_eq!((r.tag.as_deref(), r.digest), (Some("v1"), None));
        let r = ModuleRef::parse(&format!("oci://reg/p@{d}")).unwrap();
        assert_eq!((r.repository.as_str(), r.tag), ("oci://reg/p", None));
        assert!(
            ModuleRef::parse("oci://reg:5000/p")
                .unwrap_err()
                .contains("name a tag")
        );
        assert!(
            ModuleRef::parse("oci://reg/p@sha256:12")
                .unwrap_err()
                .contains("not a sha256")
        );
    }

    #[test]
    fn urls_name_a_registry_and_a_repository() {
        assert_eq!(
            parse_url("oci://registry.gitlab.example:5050/group/app/manifests"),
            Some((
                "registry.gitlab.example:5050".into(),
                "group/app/manifests".into()
            ))
        );
        assert_eq!(parse_url("oci://host"), None);
        assert_eq!(parse_url("oci://host/app:v1"), None, "the tag goes in ref:");
        assert_eq!(parse_url("https://host/app"), None);
    }
}
