//! A VHD and its parents, read as one disk.
//!
//! The chain is opened from the leaf by following each differencing image's parent locators:
//! `W2RU` (relative), `MACX` and `W2KU` (absolute), then the parent's name from the header;
//! relative paths are resolved against the directory of the child. A parent must be the one
//! the child was made from (its UUID is the child's parent UUID) and not larger than the child; a
//! child whose parent UUID is zero has a raw parent (a plain file or block device). Parents are
//! opened read-only; only the leaf may be written.
//!
//! A parent smaller than its child is a disk resized after its snapshot (`vhd-util resize` of
//! the child): the child's sectors past the parent's end that it does not hold read as zeros,
//! as the original tapdisk reads them. A VHD parent larger than its child is refused (VHDs are
//! never shrunk, so such a chain was not made by a resize); a raw parent may be larger (a
//! device of the next size up), and only its first bytes are read.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::header::{Header, Locator, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use super::image::VhdImage;
use super::shared::{LeafState, Source};
use super::{uuid_string, VhdError, MAX_CHAIN};

/// A raw image at the bottom of a chain.
#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
}

impl RawImage {
    /// Opens the raw file or block device at `path`.
    pub fn open(path: &Path, writable: bool) -> Result<Self, VhdError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| VhdError::io("cannot open", path, e))?;
        let size = file_size(&file).map_err(|e| VhdError::io("cannot size", path, e))?;
        Ok(Self {
            path: path.into(),
            file,
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes a regular file at least `size` bytes long (its new bytes read as zeros); a device
    /// that is smaller cannot grow.
    pub fn grow(&mut self, size: u64) -> Result<(), VhdError> {
        if size <= self.size {
            return Ok(());
        }
        let meta = self
            .file
            .metadata()
            .map_err(|e| VhdError::io("cannot stat", &self.path, e))?;
        if !meta.is_file() {
            return Err(VhdError::invalid(
                &self.path,
                format!("a device of {} bytes cannot grow to {size}", self.size),
            ));
        }
        self.file
            .set_len(size)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| VhdError::io("cannot grow", &self.path, e))?;
        self.size = size;
        Ok(())
    }

    /// Reads at `offset`; bytes past the end read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        self.file
            .read_exact_at(&mut buf[..avail], offset)
            .map_err(|e| VhdError::io("cannot read", &self.path, e))
    }

    /// Writes at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), VhdError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| VhdError::io("cannot write", &self.path, e))
    }

    /// `fdatasync`.
    pub fn flush(&self) -> Result<(), VhdError> {
        self.file
            .sync_data()
            .map_err(|e| VhdError::io("cannot sync", &self.path, e))
    }
}

/// The size of a regular file or block device.
fn file_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// One image of a chain.
#[derive(Debug)]
pub enum Layer {
    /// A VHD.
    Vhd(Box<VhdImage>),
    /// A raw parent.
    Raw(RawImage),
}

impl Layer {
    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            Layer::Vhd(v) => v.path(),
            Layer::Raw(r) => &r.path,
        }
    }
}

/// A leaf VHD and its parents, leaf first.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
    reads: Arc<ChainReads>,
    /// What the event loop is told of a differencing leaf, once asked: also where the parents
    /// hold the blocks it lacks ([`Chain::read`] works it out).
    shared: Option<Arc<LeafState>>,
}

/// The most runs a block read from the parents by the event loop may be in (more: the worker
/// reads it).
const MAX_RUNS: usize = 32;

/// What was read from each image of a chain, for its statistics: shared, so that another
/// thread can report it while the chain is read.
#[derive(Debug)]
pub struct ChainReads {
    /// Each image, leaf first: its path, and whether it is a VHD (else raw).
    pub images: Vec<(PathBuf, bool)>,
    sectors: Vec<AtomicU64>,
}

impl ChainReads {
    /// Sectors read from image `i` (0: the leaf).
    pub fn sectors(&self, i: usize) -> u64 {
        self.sectors.get(i).map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Counts `n` sectors read from image `i` elsewhere (the event loop's reads).
    pub fn add(&self, i: usize, n: u64) {
        if let Some(s) = self.sectors.get(i) {
            s.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Where the parent of differencing image `child` is: the paths its locators name, in order of
/// preference (relative first), then its recorded name next to it.
pub fn parent_candidates(child: &VhdImage) -> Vec<PathBuf> {
    match child.header() {
        Some(header) => candidates(child.path(), header, |l| child.locator_data(l)),
        None => Vec::new(),
    }
}

/// Where the parent of the differencing image at `child`, whose header is `header`, is: the
/// paths its locators name (their bytes read by `read`), `W2RU` first, then `MACX` and `W2KU`,
/// relative ones against the child's directory, then its recorded name next to it.
pub(crate) fn candidates(
    child: &Path,
    header: &Header,
    read: impl Fn(&Locator) -> Option<Vec<u8>>,
) -> Vec<PathBuf> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out = Vec::new();
    for code in [PLAT_W2RU, PLAT_MACX, PLAT_W2KU] {
        for l in header.locators.iter().filter(|l| l.code == code) {
            let Some(text) = read(l).and_then(|d| l.decode(&d)) else {
                continue;
            };
            if text.is_empty() {
                continue;
            }
            let p = Path::new(&text);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p.strip_prefix("./").unwrap_or(p))
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    let name = header.parent_name.trim();
    if !name.is_empty() && !name.contains('/') {
        let p = dir.join(name);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The parent file of differencing image `child`.
pub fn find_parent(child: &VhdImage) -> Result<PathBuf, VhdError> {
    let tried = parent_candidates(child);
    tried
        .iter()
        .find(|p| p.is_file() || p.exists())
        .cloned()
        .ok_or_else(|| VhdError::ParentMissing {
            path: child.path().into(),
            name: child
                .header()
                .map(|h| h.parent_name.clone())
                .unwrap_or_default(),
            tried,
        })
}

fn identity(path: &Path) -> Result<(u64, u64), VhdError> {
    let m = std::fs::metadata(path).map_err(|e| VhdError::io("cannot stat", path, e))?;
    Ok((m.dev(), m.ino()))
}

impl Chain {
    /// Opens the VHD at `path` (the leaf, writable if asked) and its parents (read-only).
    pub fn open(path: &Path, writable: bool) -> Result<Self, VhdError> {
        let leaf = VhdImage::open(path, writable)?;
        let mut seen = HashSet::new();
        seen.insert(identity(path)?);
        let mut layers = vec![Layer::Vhd(Box::new(leaf))];
        while let Some(Layer::Vhd(child)) = layers.last() {
            if !child.has_parent() {
                break;
            }
            let parent_path = find_parent(child)?;
            if layers.len() >= MAX_CHAIN {
                return Err(VhdError::BadChain {
                    path: child.path().into(),
                    detail: format!("is longer than {MAX_CHAIN} images"),
                });
            }
            if !seen.insert(identity(&parent_path)?) {
                return Err(VhdError::BadChain {
                    path: child.path().into(),
                    detail: format!("loops back to {}", parent_path.display()),
                });
            }
            let expected = child.header().map_or([0; 16], |h| h.parent_uuid);
            let size = child.size();
            let mismatch = |detail: String| VhdError::ParentMismatch {
                path: child.path().into(),
                parent: parent_path.clone(),
                detail,
            };
            let layer = if expected == [0; 16] {
                Layer::Raw(RawImage::open(&parent_path, false)?)
            } else {
                let parent = VhdImage::open(&parent_path, false)?;
                if parent.footer().uuid != expected {
                    return Err(mismatch(format!(
                        "UUID {} is not the child's parent UUID {}",
                        uuid_string(&parent.footer().uuid),
                        uuid_string(&expected)
                    )));
                }
                if parent.size() > size {
                    return Err(mismatch(format!(
                        "size {} is larger than the child's {size}",
                        parent.size()
                    )));
                }
                Layer::Vhd(Box::new(parent))
            };
            layers.push(layer);
        }
        let reads = Arc::new(ChainReads {
            images: layers
                .iter()
                .map(|l| (l.path().to_path_buf(), matches!(l, Layer::Vhd(_))))
                .collect(),
            sectors: layers.iter().map(|_| AtomicU64::new(0)).collect(),
        });
        Ok(Self {
            layers,
            reads,
            shared: None,
        })
    }

    /// What the event loop may know of the leaf ([`super::shared::LeafState`]).
    pub fn share_leaf(&mut self) -> Arc<LeafState> {
        let s = self.leaf().share();
        if self.layers.len() > 1 {
            self.shared = Some(Arc::clone(&s));
        }
        s
    }

    /// What was read from each image.
    pub fn reads(&self) -> Arc<ChainReads> {
        Arc::clone(&self.reads)
    }

    /// The images, leaf first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The leaf.
    pub fn leaf(&mut self) -> &mut VhdImage {
        match &mut self.layers[0] {
            Layer::Vhd(v) => v,
            Layer::Raw(_) => unreachable!("a chain's leaf is always a VHD"),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match &self.layers[0] {
            Layer::Vhd(v) => v.size(),
            Layer::Raw(r) => r.size(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of the disk (whole sectors).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        let (len, size) = (buf.len() as u64, self.size());
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VhdError::OutOfRange { offset, len, size });
        }
        read_layers(&mut self.layers, &self.reads.sectors, offset, buf)?;
        self.learn(offset, len);
        Ok(())
    }

    /// Tells the event loop, for each block of the leaf that `[offset, offset + len)` touches
    /// and it does not know yet, where the chain holds it: the runs of the leaf (what it has of
    /// the block) and of its parents (the rest) if every sector of it lies in one of them (none
    /// past a parent's end, none read as zeros), in at most [`MAX_RUNS`] runs; else that the
    /// chain does not hold it so. Parents never change, and the leaf's runs change only when it
    /// writes into the block (which revokes the answer first), so the answer holds until then.
    fn learn(&mut self, offset: u64, len: u64) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let bs = shared.block_size;
        if bs == 0 || len == 0 {
            return;
        }
        let size = self.size();
        for b in offset / bs..=(offset + len - 1) / bs {
            // CAST: below the leaf's block count, a `u32`.
            let b = b as u32;
            if shared.sources_known(b) {
                continue;
            }
            let start = u64::from(b) * bs;
            match self.sources_of(start, bs.min(size - start)) {
                Ok(runs) => shared.set_sources(b, runs.unwrap_or_default().into()),
                Err(e) => log::warn!("vhd: block {b}: {e}"),
            }
        }
    }

    /// Where the leaf (image 0) and its parents hold `[start, start + len)` (a block of the
    /// leaf), in runs: none without parents, if some of it reads as zeros, or if it is in more
    /// than [`MAX_RUNS`] runs.
    fn sources_of(&mut self, start: u64, len: u64) -> Result<Option<Vec<Source>>, VhdError> {
        if self.layers.len() < 2 {
            return Ok(None);
        }
        let mut runs = Vec::new();
        if !map_layers(&mut self.layers, 0, start, len, &mut runs)? || runs.len() > MAX_RUNS {
            return Ok(None);
        }
        Ok(Some(runs))
    }

    /// Writes `data` at `offset` of the disk (whole sectors), into the leaf.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VhdError> {
        self.leaf().write(offset, data)
    }

    /// Whether the disk can forget ranges (a leaf without parent).
    pub fn can_discard(&self) -> bool {
        match &self.layers[..] {
            [Layer::Vhd(v)] => v.can_discard(),
            _ => false,
        }
    }

    /// Forgets `[offset, offset + len)` of the leaf: it reads back as zeros
    /// ([`VhdImage::discard`]).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), VhdError> {
        self.leaf().discard(offset, len)
    }

    /// Makes the leaf's writes durable.
    pub fn flush(&mut self) -> Result<(), VhdError> {
        self.leaf().flush()
    }
}

/// Appends to `runs` where `layers` (the first of which is image `index` of the chain) hold
/// `[offset, offset + len)`, joining runs that continue each other. False if some of it reads
/// as zeros (past an image's end, or in no image).
fn map_layers(
    layers: &mut [Layer],
    index: usize,
    offset: u64,
    len: u64,
    runs: &mut Vec<Source>,
) -> Result<bool, VhdError> {
    let push = |runs: &mut Vec<Source>, image: usize, at: u64, len: u64| match runs.last_mut() {
        Some(last) if last.image == image && last.at + last.len == at => last.len += len,
        _ => runs.push(Source { image, at, len }),
    };
    let Some((first, rest)) = layers.split_first_mut() else {
        return Ok(false);
    };
    match first {
        Layer::Raw(r) => {
            if offset + len > r.size() {
                return Ok(false);
            }
            push(runs, index, offset, len);
            Ok(true)
        }
        Layer::Vhd(image) => {
            if offset + len > image.size() {
                return Ok(false);
            }
            let mut pos = offset;
            for (n, at) in image.map(offset, len)? {
                match at {
                    Some(at) => push(runs, index, at, n),
                    None => {
                        if !map_layers(rest, index + 1, pos, n, runs)? {
                            return Ok(false);
                        }
                    }
                }
                pos += n;
            }
            Ok(true)
        }
    }
}

fn read_layers(
    layers: &mut [Layer],
    counts: &[AtomicU64],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), VhdError> {
    let Some((first, rest)) = layers.split_first_mut() else {
        buf.fill(0);
        return Ok(());
    };
    let (count, rest_counts) = counts.split_first().expect("a count per layer");
    let counted = |n: usize| {
        count.fetch_add(n as u64 / 512, Ordering::Relaxed);
    };
    match first {
        Layer::Raw(r) => {
            r.read(offset, buf)?;
            counted(buf.len());
            Ok(())
        }
        Layer::Vhd(image) => {
            // A parent smaller than its child: what lies past its end reads as zeros (the
            // caller checked the range against the leaf; sizes are whole sectors).
            let inside = image.size().saturating_sub(offset).min(buf.len() as u64) as usize;
            let (buf, past) = buf.split_at_mut(inside);
            past.fill(0);
            if buf.is_empty() {
                return Ok(());
            }
            let runs = image.map(offset, buf.len() as u64)?;
            let mut pos = 0usize;
            for (n, at) in runs {
                let part = &mut buf[pos..pos + n as usize];
                match at {
                    Some(at) => {
                        image.read_file(at, part)?;
                        counted(part.len());
                    }
                    None => read_layers(rest, rest_counts, offset + pos as u64, part)?,
                }
                pos += n as usize;
            }
            Ok(())
        }
    }
}
