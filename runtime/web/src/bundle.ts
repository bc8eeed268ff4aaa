// Bundle checks in the page, in the native runtime's order (runtime/src/bundle.rs): the
// manifest's ed25519 signature when a public key is configured, the schema and minimum
// runtime version, then the size and sha256 of every listed file. Only listed files are
// ever fetched, and executors take the checked bytes, never a second download.

/** This runtime's version, compared with a bundle's `min_runtime_version`. */
export const RUNTIME_VERSION = "0.2.0";
const BUNDLE_SCHEMA = "slmc-bundle-1";
const MANIFEST_FILE = "manifest.json";
const SIGNATURE_FILE = "manifest.sig";

export interface FileDigest {
  path: string;
  bytes: number;
  sha256: string;
}

export interface BundleManifest {
  schema: string;
  min_runtime_version: string;
  model: { name: string };
  target: { name: string; backend: string };
  files: FileDigest[];
}

/** A refusal naming the file and the problem. */
export class BundleError extends Error {
  constructor(
    readonly file: string,
    message: string,
  ) {
    super(`${file}: ${message}`);
  }
}

export interface Trust {
  /** 64 hex digits; when set, the manifest must carry a matching signature. */
  publicKey: string | null;
  /** Accept a bundle whose signature cannot be checked for want of a key. */
  allowUnsigned: boolean;
}

export interface VerifiedBundle {
  manifest: BundleManifest;
  signatureChecked: boolean;
  /** Every listed file's checked bytes, by its path in the bundle. */
  files: Map<string, Uint8Array<ArrayBuffer>>;
  /** The bytes fetched, for the page's progress line. */
  totalBytes: number;
}

export function parseHex(s: string): Uint8Array<ArrayBuffer> | null {
  if (s.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(s)) return null;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function hex(bytes: ArrayBuffer): string {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** `have >= need`, dotted numbers compared field by field (missing fields are 0). */
export function versionAtLeast(have: string, need: string): boolean {
  const parse = (v: string) => v.split(".").map((p) => (/^\d+$/.test(p) ? Number(p) : 0));
  const a = parse(have);
  const b = parse(need);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const x = a[i] ?? 0;
    const y = b[i] ?? 0;
    if (x !== y) return x > y;
  }
  return true;
}

/** A relative path that stays inside the bundle: no absolute path, no `..`, no backslash. */
export function isRelativeInside(path: string): boolean {
  if (path === "" || path.startsWith("/") || path.includes("\\")) return false;
  return path.split("/").every((part) => part !== "" && part !== "." && part !== "..");
}

async function fetchBytes(base: string, path: string, optional: boolean): Promise<Uint8Array<ArrayBuffer> | null> {
  let response: Response;
  try {
    response = await fetch(new URL(path, base), { cache: "no-store" });
  } catch (e) {
    throw new BundleError(path, `cannot fetch: ${e}`);
  }
  if (optional && response.status === 404) return null;
  if (!response.ok) throw new BundleError(path, `cannot fetch: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function checkSignature(manifestBytes: Uint8Array<ArrayBuffer>, sigBytes: Uint8Array<ArrayBuffer>, keyHex: string): Promise<void> {
  const keyRaw = parseHex(keyHex.trim().replace(/^ed25519:/, ""));
  if (!keyRaw || keyRaw.length !== 32) throw new BundleError("public key", "not a public key (64 hex digits expected)");
  const sig = parseHex(new TextDecoder().decode(sigBytes).trim());
  if (!sig || sig.length !== 64) throw new BundleError(SIGNATURE_FILE, "not a signature (128 hex digits expected)");
  let key: CryptoKey;
  try {
    key = await crypto.subtle.importKey("raw", keyRaw, { name: "Ed25519" }, false, ["verify"]);
  } catch (e) {
    throw new BundleError("public key", `not a valid ed25519 public key: ${e}`);
  }
  const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, sig, manifestBytes);
  if (!ok) {
    throw new BundleError(
      MANIFEST_FILE,
      "the signature does not match: the manifest was altered or signed with another key",
    );
  }
}

/** Fetches and checks the bundle at `base` (a URL ending in `/`). */
export async function verifyBundle(
  base: string,
  trust: Trust,
  progress: (done: number, total: number) => void = () => {},
): Promise<VerifiedBundle> {
  const manifestBytes = (await fetchBytes(base, MANIFEST_FILE, false))!;
  const signature = await fetchBytes(base, SIGNATURE_FILE, true);
  let signatureChecked = false;
  if (signature) {
    if (trust.publicKey) {
      await checkSignature(manifestBytes, signature, trust.publicKey);
      signatureChecked = true;
    } else if (!trust.allowUnsigned) {
      throw new BundleError(base, "signed bundle, but no public key to check it with");
    }
  } else if (trust.publicKey) {
    // A configured key always wins, as natively: a deleted signature is not "unsigned".
    throw new BundleError(base, "a public key is configured but the bundle has no signature (manifest.sig): refused");
  } else if (!trust.allowUnsigned) {
    throw new BundleError(base, "unsigned bundle refused");
  }
  let manifest: BundleManifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(manifestBytes));
  } catch (e) {
    throw new BundleError(MANIFEST_FILE, `invalid manifest: ${e}`);
  }
  if (manifest.schema !== BUNDLE_SCHEMA) {
    throw new BundleError(MANIFEST_FILE, `schema \`${manifest.schema}\` is not ${BUNDLE_SCHEMA}`);
  }
  if (!Array.isArray(manifest.files)) throw new BundleError(MANIFEST_FILE, "invalid manifest: no file list");
  if (!versionAtLeast(RUNTIME_VERSION, manifest.min_runtime_version)) {
    throw new BundleError(
      MANIFEST_FILE,
      `the bundle needs slmc runtime ${manifest.min_runtime_version} or newer; this runtime is ${RUNTIME_VERSION}`,
    );
  }
  const total = manifest.files.reduce((n, f) => n + f.bytes, 0);
  const files = new Map<string, Uint8Array<ArrayBuffer>>();
  let done = 0;
  for (const f of manifest.files) {
    if (!isRelativeInside(f.path)) throw new BundleError(MANIFEST_FILE, `file \`${f.path}\` is outside the bundle`);
    const bytes = (await fetchBytes(base, f.path, false))!;
    if (bytes.length !== f.bytes) {
      throw new BundleError(f.path, `size ${bytes.length} bytes, the manifest says ${f.bytes}`);
    }
    const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
    if (digest !== f.sha256) {
      throw new BundleError(f.path, `sha256 ${digest} does not match the manifest's ${f.sha256}: the file was altered`);
    }
    files.set(f.path, bytes);
    done += bytes.length;
    progress(done, total);
  }
  files.set(MANIFEST_FILE, manifestBytes);
  return { manifest, signatureChecked, files, totalBytes: total };
}
