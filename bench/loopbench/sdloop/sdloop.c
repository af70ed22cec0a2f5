/*
 * sdloop: drives systemd 252's own loop-device code (loop_device_make_by_path
 * and loop_device_unref from libsystemd-shared-252.so, Debian 12's package
 * systemd) for bench/loopbench, one attachment at a time.
 *
 * Protocol, one line each way:
 *   "a PATH\n" -> attach PATH read-write, reply "ok\n" or "err ERRNO\n"
 *   "d\n"      -> unref the device (systemd's full teardown), reply "ok\n"
 *   "n\n"      -> no-op, reply "ok\n" (measures the pipe round trip)
 * EOF ends the process (an attached device is unref'ed first).
 *
 * Build: cc -O2 -o sdloop sdloop.c /usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-252.so \
 *          -Wl,-rpath,/usr/lib/x86_64-linux-gnu/systemd
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>

typedef struct LoopDevice LoopDevice;

/* The signatures of systemd v252's src/shared/loop-util.h. */
int loop_device_make_by_path(const char *path, int open_flags, uint32_t loop_flags, int lock_op, LoopDevice **ret);
LoopDevice *loop_device_unref(LoopDevice *d);

int main(void) {
	char line[4096];
	LoopDevice *d = NULL;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof line, stdin)) {
		line[strcspn(line, "\n")] = 0;
		if (line[0] == 'a' && line[1] == ' ') {
			if (d) {
				printf("err busy\n");
				continue;
			}
			/* loop_flags 0: systemd adds LO_FLAGS_AUTOCLEAR itself and
			 * tries direct I/O; LOCK_UN hands back no lock, as loopkit's
			 * default does. */
			int r = loop_device_make_by_path(line + 2, O_RDWR, 0, LOCK_UN, &d);
			if (r < 0) {
				d = NULL;
				printf("err %d\n", -r);
				continue;
			}
			printf("ok\n");
		} else if (line[0] == 'd') {
			d = loop_device_unref(d);
			printf("ok\n");
		} else if (line[0] == 'n') {
			printf("ok\n");
		} else {
			printf("err unknown command\n");
		}
	}
	loop_device_unref(d);
	return 0;
}
