//! A KV cache's buffers on transparent huge pages.
//!
//! Decode attention reads each sequence's K/V block by block, and a sequence's blocks lie
//! wherever the allocator put them: at 16 slots of 64 f16 values a block's run for one KV head
//! is 2 KiB. Through 4 KiB pages almost every run is a TLB miss, and the hardware prefetchers
//! stop at every page; on 2 MiB pages the cache of a whole batch fits the TLB. The buffer is
//! mapped aligned to 2 MiB and advised `MADV_HUGEPAGE`, which Linux honours in its default
//! (`madvise`) and `always` modes; where it does not, only the speed differs.

use std::ops::{Deref, DerefMut};

use crate::KvElement;

/// `len` zeroed elements of a KV cache, on huge pages where the kernel allows.
pub struct KvBuffer<T: KvElement> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    /// The mapping that holds the elements (start, bytes); none when `len` is 0.
    #[cfg(target_os = "linux")]
    map: Option<(*mut libc::c_void, usize)>,
    /// The allocation `ptr` points into, owned for its lifetime.
    #[cfg(not(target_os = "linux"))]
    _vec: Vec<T>,
}

// SAFETY: the buffer owns its elements as a `Vec<T>` would.
unsafe impl<T: KvElement> Send for KvBuffer<T> {}
// SAFETY: as above; shared access is read-only.
unsafe impl<T: KvElement> Sync for KvBuffer<T> {}

/// Huge page size on x86-64 and arm64 (with 4 KiB base pages).
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

impl<T: KvElement> KvBuffer<T> {
    /// `len` zeroed elements, every page faulted in now: the memory is claimed when the cache
    /// is made (as a peer zeroing its cache at start would), so no step later pays for a page
    /// fault, and reading slots never written reads real memory rather than the kernel's
    /// shared zero page (what a benchmark that skips the prefill would otherwise measure).
    ///
    /// # Panics
    /// If the memory cannot be mapped (as a `Vec` that cannot allocate aborts).
    #[cfg(target_os = "linux")]
    pub fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("KV buffer size overflows");
        if bytes == 0 {
            return Self {
                ptr: std::ptr::NonNull::dangling(),
                len,
                map: None,
            };
        }
        // One huge page more than the rounded size, so a 2 MiB-aligned run of whole huge
        // pages covering the elements fits inside the mapping.
        let whole = bytes.next_multiple_of(HUGE_PAGE);
        let map_len = whole + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; its pages read as zeros, which is a valid
        // value of every `KvElement` (f32, f16, bf16, and a Q8_0 block of zeros).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            base != libc::MAP_FAILED,
            "cannot map {map_len} bytes for the KV cache: {}",
            std::io::Error::last_os_error()
        );
        let start = (base as usize).next_multiple_of(HUGE_PAGE);
        // SAFETY: `start..start + whole` lies inside the mapping. The advice only changes how
        // the pages are backed; a kernel that declines it leaves 4 KiB pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, whole, libc::MADV_HUGEPAGE);
        }
        populate(start as *mut u8, whole);
        Self {
            // SAFETY: inside a successful mapping, so not null; page-aligned, so aligned for T.
            ptr: unsafe { std::ptr::NonNull::new_unchecked(start as *mut T) },
            len,
            map: Some((base, map_len)),
        }
    }

    /// `len` zeroed elements.
    #[cfg(not(target_os = "linux"))]
    pub fn zeroed(len: usize) -> Self {
        let mut vec = T::zeroed(len);
        Self {
            ptr: std::ptr::NonNull::new(vec.as_mut_ptr()).expect("a Vec's pointer is not null"),
            len,
            _vec: vec,
        }
    }
}

/// Faults in the `len` bytes at `start` (2 MiB-aligned, inside a fresh anonymous mapping)
/// for writing, as the mapping's advice says (huge pages where it can), 64 MiB pieces on every
/// core at once (a page's first touch is most of the cost, in a virtual machine especially):
/// `MADV_POPULATE_WRITE` (Linux 5.14), or a zero written to every 4 KiB page where the kernel
/// lacks it.
#[cfg(target_os = "linux")]
fn populate(start: *mut u8, len: usize) {
    use rayon::prelude::*;
    const PIECE: usize = 64 << 20;
    let start = start as usize;
    (0..len.div_ceil(PIECE)).into_par_iter().for_each(|i| {
        let (at, n) = (start + i * PIECE, PIECE.min(len - i * PIECE));
        // SAFETY: the piece lies inside the caller's mapping; populating writes nothing
        // visible.
        let done = unsafe { libc::madvise(at as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) };
        if done != 0 {
            // SAFETY: as above.
            unsafe { touch_pages(at as *mut u8, n) };
        }
    });
}

/// Writes a zero to every 4 KiB page of the `len` bytes at `start`, faulting them in.
///
/// # Safety
/// The range must be inside one writable mapping whose bytes are all zero.
#[cfg(target_os = "linux")]
unsafe fn touch_pages(start: *mut u8, len: usize) {
    for at in (0..len).step_by(4096) {
        // SAFETY: inside the mapping (the caller's promise); the byte is zero already, so this
        // changes nothing but which pages exist.
        unsafe { start.add(at).write_volatile(0) };
    }
}

impl<T: KvElement> Drop for KvBuffer<T> {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some((base, len)) = self.map {
            // SAFETY: the mapping made in `zeroed`, unmapped once; no borrow outlives `self`.
            unsafe {
                libc::munmap(base, len);
            }
        }
    }
}

impl<T: KvElement> Deref for KvBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised (zeroed or since written) elements at `ptr`, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: KvElement> DerefMut for KvBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: KvElement> std::fmt::Debug for KvBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvBuffer({} x {})", self.len, T::DTYPE)
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::Q8Block;

    #[test]
    fn buffers_start_zeroed_keep_what_is_written_and_sit_on_huge_page_boundaries() {
        for len in [0usize, 1, 1000, (2 << 20) / 2 + 7, 3 << 20] {
            let mut buf = KvBuffer::<f16>::zeroed(len);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|x| x.to_bits() == 0));
            for (i, x) in buf.iter_mut().enumerate() {
                *x = f16::from_f32((i % 1000) as f32);
            }
            assert!(buf
                .iter()
                .enumerate()
                .all(|(i, x)| x.to_f32() == (i % 1000) as f32));
            #[cfg(target_os = "linux")]
            if len > 0 {
                assert_eq!(buf.as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
        #[cfg(target_os = "linux")]
        {
            // Every page is resident from the start.
            let buf = KvBuffer::<f32>::zeroed(5 << 20);
            let bytes = std::mem::size_of_val(&*buf);
            assert_eq!(
                resident(buf.as_ptr() as *const u8, bytes),
                bytes / 4096,
                "pages not faulted in"
            );
        }
    }

    /// Pages of `len` bytes at `at` that are resident.
    #[cfg(target_os = "linux")]
    fn resident(at: *const u8, len: usize) -> usize {
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `at` is page-aligned and `at..at + len` mapped; one byte a page.
        let ok = unsafe { libc::mincore(at as *mut libc::c_void, len, pages.as_mut_ptr()) };
        assert_eq!(ok, 0, "{}", std::io::Error::last_os_error());
        pages.iter().filter(|r| *r & 1 == 1).count()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_fallback_for_kernels_without_populate_faults_every_page_in() {
        let len = 8 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let at = map as *mut u8;
        assert_eq!(resident(at, len), 0);
        // SAFETY: the whole mapping, zero since it was made.
        unsafe { touch_pages(at, len) };
        assert_eq!(resident(at, len), len / 4096);
        // SAFETY: as above; nothing borrows it.
        let bytes = unsafe { std::slice::from_raw_parts(at, len) };
        assert!(bytes.iter().all(|&b| b == 0));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(map, len) };
    }

    #[test]
    fn q8_and_f32_buffers_start_zeroed() {
        let blocks = KvBuffer::<Q8Block>::zeroed(5000);
        assert!(blocks.iter().all(|b| *b == Q8Block::default()));
        let floats = KvBuffer::<f32>::zeroed(12345);
        assert!(floats.iter().all(|&x| x == 0.0));
    }
}
