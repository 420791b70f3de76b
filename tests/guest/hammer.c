/* hammer: a hostile guest driver for the soak tier (issue 13). Run as root in an L2 guest:
 *   hammer SECONDS
 * It unbinds every virtio PCI function from its Linux driver and then, until SECONDS pass,
 * pokes the devices at random: writes and reads anywhere in their memory BARs (common, notify,
 * ISR and device configuration, MSI-X), queues set up with rings and descriptor chains full
 * of random lengths, flags and `next` links, device status sequences out of order, resets,
 * config-space writes (capabilities, command register, BARs moved and put back), and port
 * I/O on the legacy devices (COM1's status and scratch, CMOS, fw_cfg, the i8042 data port,
 * the ACPI PM registers).
 *
 * What it does not do, so that the guest itself lives through the run: DMA into memory it
 * does not own (every address it hands a device is in its own locked buffer, or above RAM,
 * or unmapped), unmasked MSI-X vectors (they could deliver exception vectors to itself), and
 * the ports that reset or power off the machine (0xcf9, i8042 commands, PM1 control).
 * It prints "HAMMER ops=N" every 10 s and "HAMMER-DONE ops=N devices=D" at the end. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEVS 16
#define BUF_PAGES 64
#define PAGE 4096

struct bar { volatile uint8_t *map; size_t len; };
struct dev {
	char name[64];
	int cfg_fd;
	struct bar bars[6];
	int msix_bar; uint32_t msix_off, msix_len;
	int common_bar; uint32_t common_off;
	int notify_bar; uint32_t notify_off;
};

static struct dev devs[MAX_DEVS];
static int ndevs;
static uint8_t *buf;
static uint64_t buf_pa[BUF_PAGES];
static uint64_t rng_state = 88172645463325252ull;

static uint64_t rnd(void) {
	rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
	return rng_state;
}

static int read_hex(const char *path, unsigned *v) {
	FILE *f = fopen(path, "r");
	if (!f) return -1;
	int ok = fscanf(f, "%x", v) == 1;
	fclose(f);
	return ok ? 0 : -1;
}

/* A guest-physical address the devices may use: inside the locked buffer mostly, sometimes
 * far above RAM or in the MMIO hole, where a device must refuse it. */
static uint64_t dma_addr(void) {
	uint64_t r = rnd();
	switch (r % 8) {
	case 0: return (rnd() | (1ull << 40)) & ~7ull;
	case 1: return 0xfe000000ull + (rnd() % 0x1000000);
	default: return buf_pa[(r >> 8) % BUF_PAGES] + (rnd() % PAGE);
	}
}

/* Fills the buffer with descriptor-shaped garbage: addresses from dma_addr(), any length,
 * any flags (NEXT, WRITE, INDIRECT), any next index; ring indexes anywhere. */
static void scribble(void) {
	for (size_t i = 0; i + 16 <= (size_t)BUF_PAGES * PAGE; i += 16) {
		uint64_t a = dma_addr();
		uint32_t len = (uint32_t)(rnd() % 4 == 0 ? rnd() : rnd() % 8192);
		uint16_t flags = (uint16_t)(rnd() & 7), next = (uint16_t)(rnd() % 300);
		memcpy(buf + i, &a, 8); memcpy(buf + i + 8, &len, 4);
		memcpy(buf + i + 12, &flags, 2); memcpy(buf + i + 14, &next, 2);
	}
}

static int phys_addrs(void) {
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0) return -1;
	for (int i = 0; i < BUF_PAGES; i++) {
		uint64_t e;
		off_t off = (off_t)(((uintptr_t)buf + (uintptr_t)i * PAGE) / PAGE) * 8;
		if (pread(fd, &e, 8, off) != 8 || !(e >> 63)) { close(fd); return -1; }
		buf_pa[i] = (e & ((1ull << 55) - 1)) * PAGE;
	}
	close(fd);
	return 0;
}

static uint8_t cfg8(struct dev *d, int off) { uint8_t v = 0; pread(d->cfg_fd, &v, 1, off); return v; }
static uint32_t cfg32(struct dev *d, int off) { uint32_t v = 0; pread(d->cfg_fd, &v, 4, off); return v; }
static void cfgw(struct dev *d, int off, const void *v, int n) { pwrite(d->cfg_fd, v, n, off); }

/* Walks the capability list: virtio's common and notify structures, MSI-X's table. */
static void find_caps(struct dev *d) {
	d->msix_bar = d->common_bar = d->notify_bar = -1;
	int p = cfg8(d, 0x34), guard = 48;
	while (p >= 0x40 && p < 0x100 && guard--) {
		uint8_t id = cfg8(d, p);
		if (id == 0x11) {
			uint32_t t = cfg32(d, p + 4);
			unsigned n = (cfg32(d, p) >> 16 & 0x7ff) + 1;
			d->msix_bar = t & 7; d->msix_off = t & ~7u; d->msix_len = n * 16;
		} else if (id == 0x09) {
			uint8_t type = cfg8(d, p + 3), bar = cfg8(d, p + 4);
			uint32_t off = cfg32(d, p + 8);
			if (type == 1) { d->common_bar = bar; d->common_off = off; }
			if (type == 2) { d->notify_bar = bar; d->notify_off = off; }
		}
		p = cfg8(d, p + 1);
	}
}

static void unbind(const char *dir, const char *name) {
	char path[512];
	snprintf(path, sizeof path, "%s/driver/unbind", dir);
	int fd = open(path, O_WRONLY);
	if (fd >= 0) { write(fd, name, strlen(name)); close(fd); }
}

static void open_dev(const char *name) {
	char dir[256], path[512];
	unsigned vendor;
	snprintf(dir, sizeof dir, "/sys/bus/pci/devices/%s", name);
	snprintf(path, sizeof path, "%s/vendor", dir);
	if (read_hex(path, &vendor) || vendor != 0x1af4 || ndevs == MAX_DEVS) return;
	unbind(dir, name);
	struct dev *d = &devs[ndevs];
	memset(d, 0, sizeof *d);
	snprintf(d->name, sizeof d->name, "%s", name);
	snprintf(path, sizeof path, "%s/config", dir);
	if ((d->cfg_fd = open(path, O_RDWR)) < 0) return;
	uint16_t cmd = 0x6; /* memory space, bus master */
	cfgw(d, 4, &cmd, 2);
	for (int b = 0; b < 6; b++) {
		snprintf(path, sizeof path, "%s/resource%d", dir, b);
		int fd = open(path, O_RDWR | O_SYNC);
		if (fd < 0) continue;
		off_t len = lseek(fd, 0, SEEK_END);
		if (len > 0 && len <= (1 << 24)) {
			void *m = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			if (m != MAP_FAILED) { d->bars[b].map = m; d->bars[b].len = (size_t)len; }
		}
		close(fd);
	}
	find_caps(d);
	ndevs++;
}

static void mmio_write(struct dev *d, int b, uint64_t off, uint64_t v, int size) {
	struct bar *bar = &d->bars[b];
	if (b < 0 || b > 5 || !bar->map || bar->len < 8) return;
	off %= bar->len - 7;
	off &= ~(uint64_t)(size - 1);
	/* MSI-X table: any address and data, but the vector stays masked. */
	if (b == d->msix_bar && off >= d->msix_off && off < d->msix_off + d->msix_len) {
		if ((off - d->msix_off) % 16 >= 12) { v |= 1; size = 4; off &= ~3ull; }
	}
	volatile uint8_t *p = bar->map + off;
	switch (size) {
	case 1: *p = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)p = (uint16_t)v; break;
	case 4: *(volatile uint32_t *)p = (uint32_t)v; break;
	default: *(volatile uint64_t *)p = v; break;
	}
}

static void mmio_read(struct dev *d) {
	struct bar *bar = &d->bars[rnd() % 6];
	if (bar->map && bar->len >= 4) (void)*(volatile uint32_t *)(bar->map + (rnd() % (bar->len - 3) & ~3ull));
}

/* A whole (wrong) driver start: a queue with rings in the buffer, status bits in some order,
 * a kick. Common configuration offsets are virtio 1.x's. */
static void queue_setup(struct dev *d) {
	int b = d->common_bar;
	if (b < 0) return;
	uint64_t c = d->common_off;
	mmio_write(d, b, c + 0x16, rnd() % 4, 2);                   /* queue_select */
	mmio_write(d, b, c + 0x18, 1u << (rnd() % 10), 2);          /* queue_size */
	mmio_write(d, b, c + 0x20, dma_addr() & ~15ull, 8);         /* queue_desc */
	mmio_write(d, b, c + 0x28, dma_addr() & ~1ull, 8);          /* queue_driver */
	mmio_write(d, b, c + 0x30, dma_addr() & ~3ull, 8);          /* queue_device */
	mmio_write(d, b, c + 0x1c, 1, 2);                           /* queue_enable */
	mmio_write(d, b, c + 0x08, rnd() % 2, 4);                   /* driver_feature_select */
	mmio_write(d, b, c + 0x0c, rnd(), 4);                       /* driver_feature */
	static const uint8_t seq[] = {1, 3, 0xb, 0xf, 0x7, 0x4f, 0x8f};
	mmio_write(d, b, c + 0x14, seq[rnd() % sizeof seq], 1);     /* device_status */
	mmio_write(d, b, c + 0x14, 0xf, 1);
	if (d->notify_bar >= 0)
		mmio_write(d, d->notify_bar, d->notify_off + (rnd() % 16) * 4, rnd(), 2);
}

static void config_poke(struct dev *d) {
	uint32_t v = (uint32_t)rnd();
	int off = 0x40 + (int)(rnd() % 0xc0);
	if (rnd() % 4 == 0) {
		/* Move a BAR somewhere and put it back. */
		int bo = 0x10 + 4 * (int)(rnd() % 6);
		uint32_t old = cfg32(d, bo);
		cfgw(d, bo, &v, 4);
		cfgw(d, bo, &old, 4);
		return;
	}
	cfgw(d, off & ~3, &v, 1 + (int)(rnd() % 4));
}

static void port_poke(void) {
	/* Not COM1's IER/FCR/LCR/MCR (the guest's own console would stop), not 0xcf8/0xcfc
	 * (the guest kernel's own config cycles), not fw_cfg DMA (its address is guest memory). */
	static const uint16_t ports[] = {0x3fd, 0x3fe, 0x3ff, 0x70, 0x71, 0x510, 0x511, 0x60,
					 0x80, 0x600, 0x601, 0x602, 0x603, 0x608, 0x609, 0x60a,
					 0x60b};
	uint16_t p = ports[rnd() % (sizeof ports / sizeof ports[0])];
	if (rnd() % 2) outb((uint8_t)rnd(), p); else (void)inb(p);
}

int main(int argc, char **argv) {
	int secs = argc > 1 ? atoi(argv[1]) : 60;
	rng_state ^= (uint64_t)time(NULL) * 2654435761u;
	buf = mmap(NULL, BUF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
	if (buf == MAP_FAILED || mlock(buf, BUF_PAGES * PAGE) || (memset(buf, 0, BUF_PAGES * PAGE), phys_addrs())) {
		perror("hammer: locked buffer"); return 1;
	}
	if (iopl(3)) { perror("hammer: iopl"); return 1; }
	DIR *dir = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	while (dir && (e = readdir(dir))) if (e->d_name[0] != '.') open_dev(e->d_name);
	if (dir) closedir(dir);
	printf("HAMMER devices=%d\n", ndevs);
	fflush(stdout);
	if (!ndevs) return 1;
	time_t end = time(NULL) + secs, report = time(NULL) + 10;
	unsigned long ops = 0;
	scribble();
	while (time(NULL) < end) {
		struct dev *d = &devs[rnd() % ndevs];
		switch (rnd() % 10) {
		case 0: case 1: case 2: mmio_write(d, (int)(rnd() % 6), rnd(), rnd(), 1 << (rnd() % 4)); break;
		case 3: case 4: queue_setup(d); break;
		case 5: if (d->common_bar >= 0) mmio_write(d, d->common_bar, d->common_off + 0x14, 0, 1); break;
		case 6: config_poke(d); break;
		case 7: mmio_read(d); break;
		case 8: port_poke(); break;
		default: if (rnd() % 64 == 0) scribble(); break;
		}
		ops++;
		if (time(NULL) >= report) {
			printf("HAMMER ops=%lu\n", ops);
			fflush(stdout);
			report = time(NULL) + 10;
		}
	}
	printf("HAMMER-DONE ops=%lu devices=%d\n", ops, ndevs);
	return 0;
}
