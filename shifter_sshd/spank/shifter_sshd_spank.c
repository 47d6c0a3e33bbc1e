/*
 * shifter-sshd SPANK plugin: --image, --volume and --module for sbatch, salloc
 * and srun.
 *
 * Submission (sbatch, salloc, srun as the user): the image name is resolved with
 * `shifter-sshd image lookup`, so an unknown image or a malformed --volume fails
 * the command at once instead of failing the job later; the resolved id is pinned
 * and everything is handed to the Prolog through the job control environment
 * (SPANK_SHIFTER_IMAGE, _IMAGE_ID, _VOLUME, _MODULE).
 *
 * Job steps (slurmstepd): SHIFTER_IMAGE, _IMAGE_ID, _VOLUME, _MODULE are set in
 * the tasks' environment for the `shifter` command, and a user error the Prolog
 * left in <state_path>/<job id>.error fails the step with that message on the
 * job's stderr. The Prolog exits 0 for user errors because a failing Prolog
 * drains the node; this is how the user hears about them instead.
 *
 * plugstack.conf:
 *   required /usr/local/lib/shifter-sshd/shifter_sshd_spank.so \
 *     shifter_sshd=/opt/shifter-sshd/venv/bin/shifter-sshd \
 *     config=/etc/shifter/udiRoot.conf state_path=/run/shifter-sshd
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(shifter_sshd, 1);

#define MSG_MAX 1024
#define ID_MAX 256

enum { OPT_IMAGE, OPT_VOLUME, OPT_MODULE, OPT_COUNT };

/* Option values as given; the callback has no spank_t, so they wait here. */
static char *opt_value[OPT_COUNT];
/* Variable suffixes: SHIFTER_<x> in tasks, SPANK_SHIFTER_<x> for the Prolog. */
static const char *var_name[OPT_COUNT] = { "SHIFTER_IMAGE", "SHIFTER_VOLUME",
					   "SHIFTER_MODULE" };

static const char *arg_shifter_sshd = "/opt/shifter-sshd/venv/bin/shifter-sshd";
static const char *arg_config = NULL;
static const char *arg_state_path = "/run/shifter-sshd";

static int set_option(int val, const char *optarg, int remote)
{
	(void)remote;
	if (val < 0 || val >= OPT_COUNT || optarg == NULL)
		return -1;
	free(opt_value[val]);
	opt_value[val] = strdup(optarg);
	return opt_value[val] ? 0 : -1;
}

static struct spank_option options[] = {
	{ "image", "type:tag", "run the job in this shifter-sshd container image",
	  1, OPT_IMAGE, set_option },
	{ "volume", "/src:/dst[:ro][;...]", "bind host paths into the container",
	  1, OPT_VOLUME, set_option },
	{ "module", "name[,name...]", "site modules to load into the container",
	  1, OPT_MODULE, set_option },
	SPANK_OPTIONS_TABLE_END
};

static int parse_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "shifter_sshd=", 13) == 0)
			arg_shifter_sshd = av[i] + 13;
		else if (strncmp(av[i], "config=", 7) == 0)
			arg_config = av[i] + 7;
		else if (strncmp(av[i], "state_path=", 11) == 0)
			arg_state_path = av[i] + 11;
		else {
			slurm_error("shifter-sshd: plugstack.conf: unknown plugin argument (known: shifter_sshd=, config=, state_path=): %s",
				    av[i]);
			return -1;
		}
	}
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (parse_args(ac, av) < 0)
		return -1;
	for (struct spank_option *o = options; o->name; o++) {
		if (spank_option_register(sp, o) != ESPANK_SUCCESS) {
			slurm_error("shifter-sshd: cannot register option --%s", o->name);
			return -1;
		}
	}
	return 0;
}

/* --- submission: validate, resolve, pin, hand over to the Prolog ------------- */

/* One volume "/src:/dst[:flags]", the syntax shifter_sshd.volumes checks. */
static const char *volume_problem(char *spec)
{
	char *parts[4] = { 0 };
	int n = 0;
	for (char *p = spec, *tok; n < 4 && (tok = strsep(&p, ":")) != NULL;)
		parts[n++] = tok;
	if (n < 2 || n > 3 || parts[3] != NULL || !*parts[0] || !*parts[1])
		return "expected /source:/destination[:ro]";
	for (int i = 0; i < 2; i++) {
		if (parts[i][0] != '/')
			return "paths must be absolute";
		if (strstr(parts[i], "/../") || !strcmp(parts[i] + strlen(parts[i]) - 3, "/.."))
			return "paths may not contain '..'";
	}
	for (char *p = n == 3 ? parts[2] : NULL, *flag; p && (flag = strsep(&p, ","));) {
		if (*flag && strcmp(flag, "ro") && strcmp(flag, "rw"))
			return "unknown flag (allowed: ro, rw)";
	}
	return NULL;
}

static int check_volumes(const char *value)
{
	char *copy = strdup(value), *rest = copy, *spec;
	int rc = 0;
	if (!copy)
		return -1;
	while (rc == 0 && (spec = strsep(&rest, ";")) != NULL) {
		while (isspace((unsigned char)*spec))
			spec++;
		for (char *e = spec + strlen(spec); e > spec && isspace((unsigned char)e[-1]);)
			*--e = '\0';
		char *whole = strdup(spec);
		const char *problem = *spec ? volume_problem(spec) : NULL;
		if (problem) {
			slurm_error("shifter-sshd: --volume: %s: %s", problem, whole ? whole : value);
			rc = -1;
		}
		free(whole);
	}
	free(copy);
	return rc;
}

static int check_modules(const char *value)
{
	for (const char *p = value; *p; p++) {
		if (!isalnum((unsigned char)*p) && !strchr("_.-,", *p)) {
			slurm_error("shifter-sshd: --module: expected name[,name...]: %s", value);
			return -1;
		}
	}
	return 0;
}

/* Read all of fd into buf (NUL-terminated, truncated to len - 1). */
static void slurp(int fd, char *buf, size_t len)
{
	size_t used = 0;
	ssize_t got;
	while ((got = read(fd, buf + used, len - 1 - used)) != 0) {
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			break;
		used += (size_t)got;
		if (used == len - 1) {
			char sink[256];
			while (read(fd, sink, sizeof(sink)) > 0)
				;
			break;
		}
	}
	buf[used] = '\0';
}

static void chomp(char *s)
{
	for (char *e = s + strlen(s); e > s && isspace((unsigned char)e[-1]);)
		*--e = '\0';
}

/*
 * `shifter-sshd [--config C] image lookup NAME`, run as the submitting user
 * (this process is the user's sbatch). Its stdout is the id; on failure its
 * stderr is the message.
 */
static int lookup_image(const char *name, char *id, char *msg)
{
	int out[2], err[2], status;
	if (pipe(out) < 0 || pipe(err) < 0) {
		snprintf(msg, MSG_MAX, "pipe: %s", strerror(errno));
		return -1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		snprintf(msg, MSG_MAX, "fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		const char *argv[] = { arg_shifter_sshd, "image", "lookup", name, NULL, NULL, NULL };
		if (arg_config) {
			argv[1] = "--config";
			argv[2] = arg_config;
			argv[3] = "image";
			argv[4] = "lookup";
			argv[5] = name;
		}
		dup2(out[1], STDOUT_FILENO);
		dup2(err[1], STDERR_FILENO);
		close(out[0]);
		close(err[0]);
		int devnull = open("/dev/null", O_RDONLY);
		if (devnull >= 0)
			dup2(devnull, STDIN_FILENO);
		execv(arg_shifter_sshd, (char *const *)argv);
		dprintf(STDERR_FILENO, "cannot run %s: %s", arg_shifter_sshd, strerror(errno));
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	slurp(out[0], id, ID_MAX);
	slurp(err[0], msg, MSG_MAX);
	close(out[0]);
	close(err[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	chomp(id);
	chomp(msg);
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && *id)
		return 0;
	if (!*msg)
		snprintf(msg, MSG_MAX, "image lookup failed (status %d)", status);
	return -1;
}

static int resolve_image(const char *name, char *id)
{
	char msg[MSG_MAX];
	if (lookup_image(name, id, msg) == 0)
		return 0;
	/* The last line is the error; drop its own "shifter-sshd: " prefix. */
	char *line = strrchr(msg, '\n') ? strrchr(msg, '\n') + 1 : msg;
	if (strncmp(line, "shifter-sshd: ", 14) == 0)
		line += 14;
	if (strstr(line, name))
		slurm_error("shifter-sshd: --image: %s", line);
	else
		slurm_error("shifter-sshd: --image: %s: %s", line, name);
	return -1;
}

/*
 * SPANK_<name> for the Prolog and Epilog, and SLURM_SPANK_<name> in this
 * command's environment, which the job's steps inherit: sbatch and salloc would
 * export it themselves, srun does not.
 */
static int control_setenv(spank_t sp, const char *name, const char *value)
{
	char exported[64];
	spank_err_t rc = spank_job_control_setenv(sp, name, value, 1);
	if (rc != ESPANK_SUCCESS) {
		slurm_error("shifter-sshd: cannot pass %s to the prolog: %s", name,
			    spank_strerror(rc));
		return -1;
	}
	snprintf(exported, sizeof(exported), "SLURM_SPANK_%s", name);
	setenv(exported, value, 1);
	return 0;
}

static int submit(spank_t sp)
{
	char id[ID_MAX];
	if (!opt_value[OPT_IMAGE]) {
		if (opt_value[OPT_VOLUME] || opt_value[OPT_MODULE]) {
			slurm_error("shifter-sshd: --%s needs --image: %s",
				    opt_value[OPT_VOLUME] ? "volume" : "module",
				    opt_value[OPT_VOLUME] ? opt_value[OPT_VOLUME] : opt_value[OPT_MODULE]);
			return -1;
		}
		return 0; /* not a container job: nothing to do */
	}
	if (opt_value[OPT_VOLUME] && check_volumes(opt_value[OPT_VOLUME]) < 0)
		return -1;
	if (opt_value[OPT_MODULE] && check_modules(opt_value[OPT_MODULE]) < 0)
		return -1;
	if (resolve_image(opt_value[OPT_IMAGE], id) < 0)
		return -1;
	if (control_setenv(sp, "SHIFTER_IMAGE_ID", id) < 0)
		return -1;
	for (int i = 0; i < OPT_COUNT; i++) {
		if (opt_value[i] && control_setenv(sp, var_name[i], opt_value[i]) < 0)
			return -1;
	}
	return 0;
}

/* --- job steps: the tasks' environment and the Prolog's user errors ---------- */

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	spank_context_t ctx = spank_context();
	if (ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR)
		return submit(sp);
	return 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	char buf[MSG_MAX], name[64];
	for (int i = 0; i < OPT_COUNT; i++) {
		const char *value = opt_value[i];
		/* sbatch and salloc export the control environment as SLURM_SPANK_*. */
		snprintf(name, sizeof(name), "SLURM_SPANK_%s", var_name[i]);
		if (!value && spank_getenv(sp, name, buf, sizeof(buf)) == ESPANK_SUCCESS)
			value = buf;
		if (value)
			spank_setenv(sp, var_name[i], value, 1);
	}
	if (spank_getenv(sp, "SLURM_SPANK_SHIFTER_IMAGE_ID", buf, sizeof(buf)) == ESPANK_SUCCESS)
		spank_setenv(sp, "SHIFTER_IMAGE_ID", buf, 1);
	/* `shifter` in the tasks reads the same udiRoot.conf as the Prolog. */
	if (arg_config && spank_getenv(sp, "SHIFTER_IMAGE_ID", buf, sizeof(buf)) == ESPANK_SUCCESS)
		spank_setenv(sp, "SHIFTER_SSHD_CONFIG", arg_config, 0);
	return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	uint32_t job_id;
	char path[4096], msg[MSG_MAX];
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS)
		return 0;
	snprintf(path, sizeof(path), "%s/%u.error", arg_state_path, job_id);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0; /* the usual case: the Prolog had nothing to say */
	slurp(fd, msg, sizeof(msg));
	close(fd);
	chomp(msg);
	/* This process is the task: its stderr is the job's. */
	dprintf(STDERR_FILENO, "%s\n", *msg ? msg : "shifter-sshd: the container could not be set up");
	return -1;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	for (int i = 0; i < OPT_COUNT; i++) {
		free(opt_value[i]);
		opt_value[i] = NULL;
	}
	return 0;
}
