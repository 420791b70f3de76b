/* The guest init of `ferrovm run -- CMD`: built static by build.rs and embedded in ferrovm,
 * which puts it at /init of the initramfs it makes, with these files:
 *
 *   /ferrovm/modules  kernel modules to load, one path per line, dependencies first
 *   /ferrovm/argv     CMD and its arguments, each ending in NUL
 *   /ferrovm/env      the environment, KEY=VALUE each ending in NUL
 *   /ferrovm/cwd      the working directory (shared read-write as virtiofs tag ferrovm-cwd)
 *   /ferrovm/root     "host" (virtiofs tag ferrovm-root, read-only, under a tmpfs overlay),
 *                     "initramfs" (stay in the initramfs) or "disk" (/dev/vda)
 *
 * The command's stdin, stdout and stderr are vsock streams to the host (CID 2) ports 4, 1 and
 * 2. When it ends, init shuts its output streams down and waits until the host has closed
 * them (so every byte has reached the host), sends "exit N", "signal N" or, if it could not
 * start the command, "error MESSAGE" on port 3 the same way, and powers the VM off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define PORT_STDOUT 1
#define PORT_STDERR 2
#define PORT_STATUS 3
#define PORT_STDIN 4
#define MODULE_INIT_COMPRESSED_FILE 4

static int status_sock = -1;
static int tracing;

/* With ferrovm.trace on the kernel command line (ferrovm -v adds it): each step on the
 * console, with the time since boot. */
static void trace(const char *what)
{
	struct timespec t;
	if (!tracing)
		return;
	clock_gettime(CLOCK_BOOTTIME, &t);
	dprintf(2, "ferrovm-init: %ld.%03ld %s\n", (long)t.tv_sec, t.tv_nsec / 1000000, what);
}

static void power_off(void)
{
	trace("power off");
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

/* Waits (at most `ms`) until the host closes its end of `s`; input is discarded. */
static void wait_closed(int s, int ms)
{
	char buf[4096];
	struct pollfd p = { .fd = s, .events = POLLIN };
	while (poll(&p, 1, ms) > 0) {
		ssize_t n = read(s, buf, sizeof(buf));
		if (n <= 0 && !(n < 0 && errno == EINTR))
			return;
	}
}

static int vsock_connect(unsigned port)
{
	struct sockaddr_vm a;
	memset(&a, 0, sizeof(a));
	a.svm_family = AF_VSOCK;
	a.svm_cid = VMADDR_CID_HOST;
	a.svm_port = port;
	/* The transport may still be probing: retry for ten seconds in all. */
	struct timespec now, end;
	clock_gettime(CLOCK_MONOTONIC, &end);
	end.tv_sec += 10;
	do {
		int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof(a)) == 0)
			return s;
		if (s >= 0)
			close(s);
		struct timespec t = { 0, 10 * 1000 * 1000 };
		nanosleep(&t, NULL);
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while (now.tv_sec < end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec < end.tv_nsec));
	return -1;
}

/* Reports a status line to the host and powers off. */
static void finish(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (status_sock < 0)
		status_sock = vsock_connect(PORT_STATUS);
	if (status_sock >= 0) {
		if (write(status_sock, line, n) == n) {
			shutdown(status_sock, SHUT_WR);
			wait_closed(status_sock, 5000);
		}
		trace("status sent");
	} else {
		/* No channel to the host: the console is all there is. */
		fprintf(stderr, "ferrovm-init: %.*s", n, line);
	}
	power_off();
}

static void fail(const char *what, const char *arg)
{
	finish("error %s %s: %s", what, arg, strerror(errno));
}

/* Reads a whole file from the initramfs (NUL-terminated; *len without the NUL). */
static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap + 1);
	for (;;) {
		if (!buf)
			return NULL;
		ssize_t r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 1);
		}
	}
	close(fd);
	buf[n] = '\0';
	if (len)
		*len = n;
	return buf;
}

/* Splits a NUL-separated list into a NULL-terminated vector. */
static char **split_nul(char *buf, size_t len)
{
	size_t count = 0;
	for (size_t i = 0; i < len; i++)
		count += buf[i] == '\0';
	char **v = calloc(count + 1, sizeof(char *));
	if (!v)
		return NULL;
	size_t k = 0;
	for (size_t i = 0; i < len && k < count; i += strlen(buf + i) + 1)
		v[k++] = buf + i;
	v[k] = NULL;
	return v;
}

static void load_modules(void)
{
	char *list = slurp("/ferrovm/modules", NULL);
	if (!list)
		return;
	for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
		int fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		size_t l = strlen(line);
		int flags = (l > 3 && strcmp(line + l - 3, ".ko") == 0) ? 0 : MODULE_INIT_COMPRESSED_FILE;
		if (syscall(SYS_finit_module, fd, "", flags) != 0 && errno != EEXIST)
			fprintf(stderr, "ferrovm-init: cannot load %s: %s\n", line, strerror(errno));
		close(fd);
	}
	free(list);
}

/* mkdir -p */
static void make_dirs(const char *path)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s", path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p == '/') {
			*p = '\0';
			mkdir(tmp, 0755);
			*p = '/';
		}
	}
	mkdir(tmp, 0755);
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags,
		       const char *data)
{
	make_dirs(dst);
	if (mount(src, dst, type, flags, data) != 0)
		finish("error cannot mount %s (%s) on %s: %s", src, type, dst, strerror(errno));
}

/* Mounts /dev/vda on `dst`, trying each block file system the kernel knows. */
static void mount_disk(const char *dst)
{
	char *fs = slurp("/proc/filesystems", NULL);
	make_dirs(dst);
	for (char *line = fs ? strtok(fs, "\n") : NULL; line; line = strtok(NULL, "\n")) {
		if (strncmp(line, "nodev", 5) == 0)
			continue;
		while (*line == '\t' || *line == ' ')
			line++;
		if (mount("/dev/vda", dst, line, 0, NULL) == 0)
			return;
	}
	finish("error cannot mount /dev/vda: no file system the kernel knows fits");
}

/* Builds the command's root at /newroot (or stays in the initramfs); returns its path. */
static const char *setup_root(const char *cwd)
{
	char *root = slurp("/ferrovm/root", NULL);
	const char *top = "/newroot";
	if (root && strncmp(root, "host", 4) == 0) {
		must_mount("ferrovm-root", "/lower", "virtiofs", MS_RDONLY, NULL);
		must_mount("tmpfs", "/upper", "tmpfs", 0, "mode=0755");
		make_dirs("/upper/u");
		make_dirs("/upper/w");
		must_mount("overlay", top, "overlay", 0,
			   "lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w");
	} else if (root && strncmp(root, "disk", 4) == 0) {
		mount_disk(top);
	} else {
		top = "/";
	}
	char path[4096];
	const char *base = strcmp(top, "/") == 0 ? "" : top;
	snprintf(path, sizeof(path), "%s/proc", base);
	must_mount("proc", path, "proc", 0, NULL);
	snprintf(path, sizeof(path), "%s/sys", base);
	must_mount("sysfs", path, "sysfs", 0, NULL);
	snprintf(path, sizeof(path), "%s/dev", base);
	if (strcmp(top, "/") != 0)
		must_mount("devtmpfs", path, "devtmpfs", 0, NULL);
	snprintf(path, sizeof(path), "%s/tmp", base);
	must_mount("tmpfs", path, "tmpfs", 0, "mode=1777");
	snprintf(path, sizeof(path), "%s/run", base);
	must_mount("tmpfs", path, "tmpfs", 0, "mode=0755");
	if (cwd) {
		snprintf(path, sizeof(path), "%s%s", base, cwd);
		must_mount("ferrovm-cwd", path, "virtiofs", 0, NULL);
	}
	free(root);
	return top;
}

static void run_child(char **argv, char **envp, const char *cwd, int in, int out, int err)
{
	setsid();
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
		_exit(125);
	if (cwd && chdir(cwd) != 0) {
		dprintf(2, "ferrovm: cannot enter %s in the guest: %s\n", cwd, strerror(errno));
		_exit(125);
	}
	execvpe(argv[0], argv, envp);
	int e = errno;
	dprintf(2, "ferrovm: %s: %s\n", argv[0], strerror(e));
	_exit(e == ENOENT ? 127 : 126);
}

int main(void)
{
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	char *cmdline = slurp("/proc/cmdline", NULL);
	tracing = cmdline && strstr(cmdline, "ferrovm.trace") != NULL;
	free(cmdline);
	trace("start");
	load_modules();
	trace("modules loaded");
	int out = vsock_connect(PORT_STDOUT);
	int err = vsock_connect(PORT_STDERR);
	int in = vsock_connect(PORT_STDIN);
	if (out < 0 || err < 0 || in < 0)
		finish("error cannot reach the host over vsock: %s", strerror(errno));

	size_t argv_len = 0, env_len = 0;
	char *argv_buf = slurp("/ferrovm/argv", &argv_len);
	char *env_buf = slurp("/ferrovm/env", &env_len);
	char *cwd = slurp("/ferrovm/cwd", NULL);
	if (!argv_buf || argv_len == 0)
		fail("no command in", "/ferrovm/argv");
	char **argv = split_nul(argv_buf, argv_len);
	char **envp = env_buf ? split_nul(env_buf, env_len) : calloc(1, sizeof(char *));
	if (!argv || !envp)
		fail("out of memory reading", "/ferrovm");
	sethostname("ferrovm", 7);

	trace("connected");
	const char *top = setup_root(cwd);
	trace("root mounted");
	if (strcmp(top, "/") != 0 && (chdir(top) != 0 || chroot(".") != 0))
		fail("cannot enter the root", top);

	pid_t child = fork();
	if (child < 0)
		fail("cannot start", argv[0]);
	if (child == 0)
		run_child(argv, envp, cwd, in, out, err);
	close(in);
	int st = 0;
	for (;;) {
		pid_t p = wait(&st);
		if (p == child)
			break;
		if (p < 0 && errno == ECHILD)
			break;
	}
	/* The command is done: end its streams, and wait until the host has read them. */
	trace("command ended");
	shutdown(out, SHUT_WR);
	shutdown(err, SHUT_WR);
	/* No deadline: a slow reader of ferrovm's output must not lose the end of it. */
	wait_closed(out, -1);
	wait_closed(err, -1);
	trace("streams closed");
	if (WIFSIGNALED(st))
		finish("signal %d", WTERMSIG(st));
	finish("exit %d", WIFEXITED(st) ? WEXITSTATUS(st) : 125);
	return 0;
}
