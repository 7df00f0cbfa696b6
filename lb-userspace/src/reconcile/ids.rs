//! Frontend and backend ids.

/// Round-robin id allocator over `1..limit`.
#[derive(Debug)]
pub struct IdAllocator {
    used: Vec<bool>,
    next: u32,
    in_use: u32,
}

impl IdAllocator {
    pub fn new(limit: u32) -> Self {
        Self {
            used: vec![false; limit as usize],
            next: 1,
            in_use: 0,
        }
    }

    /// Ids still free.
    pub fn available(&self) -> u32 {
        (self.used.len() as u32).saturating_sub(1 + self.in_use)
    }

    pub fn allocate(&mut self) -> Option<u32> {
        let limit = self.used.len() as u32;
        if self.in_use + 1 >= limit {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if id + 1 >= limit { 1 } else { id + 1 };
            if !self.used[id as usize] {
                self.used[id as usize] = true;
                self.in_use += 1;
                return Some(id);
            }
        }
    }

    /// Marks an id found in the kernel as taken. Returns false if it is out of range or
    /// already taken.
    pub fn claim(&mut self, id: u32) -> bool {
        match self.used.get_mut(id as usize) {
            Some(slot) if id != 0 && !*slot => {
                *slot = true;
                self.in_use += 1;
                self.next = self.next.max(id + 1) % self.used.len() as u32;
                self.next = self.next.max(1);
                true
            }
            _ => false,
        }
    }

    pub fn release(&mut self, id: u32) {
        if let Some(slot) = self.used.get_mut(id as usize)
            && *slot
        {
            *slot = false;
            self.in_use -= 1;
        }
    }
}
