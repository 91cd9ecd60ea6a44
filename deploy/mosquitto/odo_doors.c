/*
 * odo_doors: the two checks mosquitto 2.0's own configuration cannot make for the odoledger
 * broker (deploy/mosquitto/README.md, "The broker's doors").
 *
 * 1. SUBSCRIBE. mosquitto's acl_file grants every subscription and checks only each delivered
 *    message, so a client could join the backend's share group ("$share/odo-backend/...") and take
 *    its turn of the records, which the read check then drops. Here a subscription is granted only
 *    when one of the client's read grants in that same ACL file covers every topic the filter can
 *    match, and "$share/<group>/<filter>" only when <group> is the client's own user name. Reads and
 *    writes are left to acl_file.
 *
 * 2. Client ids on a listener without use_identity_as_username (the services' port). mosquitto
 *    then asks this plugin to authenticate: the user name becomes the certificate's CN (never what
 *    the client sent), and the client id must be the CN, or, for the accounts named in
 *    plugin_opt_suffixed_ids, the CN, a '-' and a suffix. A client whose id is not its own is
 *    refused at CONNECT (Not authorized), before it can take over anyone's session.
 *
 * Options: plugin_opt_acl_file PATH (required; the acl_file), plugin_opt_suffixed_ids NAME[,NAME...].
 * The ACL file is read again when mosquitto reloads (SIGHUP).
 */

#include <openssl/x509.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_LINE 1024
#define MAX_GRANTS 4096
#define MAX_NAME 128
#define MAX_SUFFIXED 16

struct grant {
	char user[MAX_NAME + 1];  /* "" for a pattern, which applies to every client */
	char topic[MAX_LINE];
	bool pattern;
};

struct acl {
	struct grant *grants;
	int count;
};

static mosquitto_plugin_id_t *plugin_id;
static char acl_path[MAX_LINE];
static struct acl acl;
static char suffixed[MAX_SUFFIXED][MAX_NAME + 1];
static int suffixed_count;

/* Read the read grants ("topic read|readwrite T" under "user U", "pattern read|readwrite T") of
 * a mosquitto acl_file. Returns false, leaving *out alone, if the file cannot be read. */
static bool acl_load(const char *path, struct acl *out)
{
	FILE *f = fopen(path, "r");
	char line[MAX_LINE], user[MAX_NAME + 1] = "";
	struct acl a = {calloc(MAX_GRANTS, sizeof(struct grant)), 0};
	int n = 0;

	if(!f || !a.grants){
		if(f) fclose(f);
		free(a.grants);
		return false;
	}
	while(fgets(line, sizeof(line), f)){
		char *s = line, *kind, *access, *topic, *end;
		bool pattern;

		n++;
		end = s + strlen(s);
		while(end > s && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' ' || end[-1] == '\t')) *--end = '\0';
		while(*s == ' ' || *s == '\t') s++;
		if(*s == '\0' || *s == '#') continue;
		kind = s;
		s = strpbrk(s, " \t");
		if(!s) continue;
		*s++ = '\0';
		while(*s == ' ' || *s == '\t') s++;
		if(!strcmp(kind, "user")){
			if(strlen(s) > MAX_NAME){
				mosquitto_log_printf(MOSQ_LOG_WARNING, "odo_doors: %s:%d: user name too long", path, n);
				user[0] = '\0';
				continue;
			}
			strcpy(user, s);
			continue;
		}
		pattern = !strcmp(kind, "pattern");
		if(!pattern && strcmp(kind, "topic")) continue;
		access = s;
		topic = strpbrk(s, " \t");
		if(topic){
			*topic++ = '\0';
			while(*topic == ' ' || *topic == '\t') topic++;
		}else{
			topic = access;
			access = "readwrite";
		}
		if(strcmp(access, "read") && strcmp(access, "readwrite")) continue;
		if(!pattern && user[0] == '\0') continue;  /* a grant for clients without a user name */
		if(a.count == MAX_GRANTS){
			mosquitto_log_printf(MOSQ_LOG_WARNING, "odo_doors: %s: more than %d read grants, the rest ignored",
					path, MAX_GRANTS);
			break;
		}
		a.grants[a.count].pattern = pattern;
		strcpy(a.grants[a.count].user, pattern ? "" : user);
		strcpy(a.grants[a.count].topic, topic);
		a.count++;
	}
	fclose(f);
	free(out->grants);
	*out = a;
	return true;
}

/* The next level of a topic or filter: its length; *rest moves past it and its '/'. */
static size_t level(const char **rest, bool *more)
{
	const char *slash = strchr(*rest, '/');
	size_t len = slash ? (size_t)(slash - *rest) : strlen(*rest);

	*more = slash != NULL;
	*rest += len + (slash ? 1 : 0);
	return len;
}

/* Whether grant filter g matches every topic that filter f can match. */
static bool covers(const char *g, const char *f)
{
	bool first = true, gmore = true, fmore = true;

	while(gmore){
		const char *gl = g, *fl = f;
		size_t glen = level(&g, &gmore), flen;

		if(glen == 1 && gl[0] == '#'){
			return !(first && f[0] == '$');
		}
		if(!fmore){
			/* f has no more levels: "a/#" still covers "a" */
			return glen == 1 && gl[0] == '#';
		}
		flen = level(&f, &fmore);
		if(glen == 1 && gl[0] == '+'){
			if(flen == 1 && fl[0] == '#') return false;
			if(first && flen > 0 && fl[0] == '$') return false;
		}else{
			if(flen == 1 && (fl[0] == '+' || fl[0] == '#')) return false;
			if(glen != flen || strncmp(gl, fl, glen)) return false;
		}
		first = false;
	}
	return !fmore;
}

/* A pattern's topic with %u and %c replaced; false if it does not fit. */
static bool expand(const char *pattern, const char *user, const char *id, char *out, size_t size)
{
	size_t n = 0;

	for(const char *p = pattern; *p; p++){
		const char *sub = NULL;
		if(p[0] == '%' && (p[1] == 'u' || p[1] == 'c')){
			sub = p[1] == 'u' ? user : id;
			p++;
		}
		if(sub){
			size_t len = strlen(sub);
			if(n + len >= size) return false;
			memcpy(out + n, sub, len);
			n += len;
		}else{
			if(n + 1 >= size) return false;
			out[n++] = *p;
		}
	}
	out[n] = '\0';
	return true;
}

static bool readable(const char *user, const char *id, const char *filter)
{
	char topic[MAX_LINE * 2];

	for(int i = 0; i < acl.count; i++){
		const struct grant *gr = &acl.grants[i];
		if(gr->pattern){
			if(expand(gr->topic, user, id, topic, sizeof(topic)) && covers(topic, filter)) return true;
		}else if(!strcmp(gr->user, user) && covers(gr->topic, filter)){
			return true;
		}
	}
	return false;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user, *id, *filter;
	(void)event;
	(void)userdata;

	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
	user = mosquitto_client_username(ed->client);
	id = mosquitto_client_id(ed->client);
	filter = ed->topic;
	if(!user || !id || strpbrk(user, "+#/") || strpbrk(id, "+#/")) return MOSQ_ERR_ACL_DENIED;
	if(!strncmp(filter, "$share/", 7)){
		const char *group = filter + 7, *slash = strchr(group, '/');
		size_t len = slash ? (size_t)(slash - group) : 0;
		if(!slash || len != strlen(user) || strncmp(group, user, len)){
			mosquitto_log_printf(MOSQ_LOG_WARNING, "odo_doors: denied %s (user %s) the shared subscription %s: "
					"a share group is joined only by the user it is named after", id, user, filter);
			return MOSQ_ERR_ACL_DENIED;
		}
		filter = slash + 1;
	}
	if(readable(user, id, filter)) return MOSQ_ERR_SUCCESS;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "odo_doors: denied %s (user %s) the subscription %s", id, user, ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

/* The certificate's CN, if it has exactly one that fits and holds no NUL. */
static bool certificate_cn(X509 *cert, char *out, size_t size)
{
	X509_NAME *name = X509_get_subject_name(cert);
	int i = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
	ASN1_STRING *data;
	int len;

	if(i < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, i) >= 0) return false;
	data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
	len = data ? ASN1_STRING_length(data) : -1;
	if(len <= 0 || (size_t)len >= size) return false;
	memcpy(out, ASN1_STRING_get0_data(data), (size_t)len);
	out[len] = '\0';
	return strlen(out) == (size_t)len;
}

static bool id_allowed(const char *cn, const char *id)
{
	size_t n = strlen(cn);

	if(!strcmp(id, cn)) return true;
	for(int i = 0; i < suffixed_count; i++){
		if(strcmp(cn, suffixed[i])) continue;
		if(strncmp(id, cn, n) || id[n] != '-' || id[n + 1] == '\0') return false;
		for(const char *p = id + n + 1; *p; p++){
			if(!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-", *p)) return false;
		}
		return strlen(id) <= 128;
	}
	return false;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	X509 *cert = mosquitto_client_certificate(ed->client);
	const char *id = mosquitto_client_id(ed->client);
	char cn[MAX_NAME + 1];
	bool named;
	(void)event;
	(void)userdata;

	if(!cert){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "odo_doors: refused %s: no client certificate", id ? id : "?");
		return MOSQ_ERR_AUTH;
	}
	named = certificate_cn(cert, cn, sizeof(cn));
	X509_free(cert);
	if(!named){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "odo_doors: refused %s: its certificate has no usable CN",
				id ? id : "?");
		return MOSQ_ERR_AUTH;
	}
	if(!id || !id_allowed(cn, id)){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "odo_doors: refused the client id %s to certificate %s: "
				"a client id is its certificate's CN%s", id ? id : "?", cn,
				suffixed_count ? " (or, for the accounts in suffixed_ids, the CN, '-' and a suffix)" : "");
		return MOSQ_ERR_AUTH;
	}
	return mosquitto_set_username(ed->client, cn) == MOSQ_ERR_SUCCESS ? MOSQ_ERR_SUCCESS : MOSQ_ERR_AUTH;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	if(!acl_load(acl_path, &acl)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "odo_doors: cannot read %s; keeping the subscriptions it granted before",
				acl_path);
	}
	return MOSQ_ERR_SUCCESS;
}

static bool parse_suffixed(const char *value)
{
	const char *p = value;

	while(*p){
		size_t len = strcspn(p, ", ");
		if(len > 0){
			if(len > MAX_NAME || suffixed_count == MAX_SUFFIXED) return false;
			memcpy(suffixed[suffixed_count], p, len);
			suffixed[suffixed_count][len] = '\0';
			suffixed_count++;
		}
		p += len;
		p += strspn(p, ", ");
	}
	return true;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	(void)userdata;
	plugin_id = identifier;
	for(int i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "acl_file")){
			if(strlen(options[i].value) >= sizeof(acl_path)) return MOSQ_ERR_INVAL;
			strcpy(acl_path, options[i].value);
		}else if(!strcmp(options[i].key, "suffixed_ids")){
			if(!parse_suffixed(options[i].value)){
				mosquitto_log_printf(MOSQ_LOG_ERR, "odo_doors: suffixed_ids: at most %d names of at most %d characters",
						MAX_SUFFIXED, MAX_NAME);
				return MOSQ_ERR_INVAL;
			}
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "odo_doors: unknown option plugin_opt_%s", options[i].key);
			return MOSQ_ERR_INVAL;
		}
	}
	if(acl_path[0] == '\0'){
		mosquitto_log_printf(MOSQ_LOG_ERR, "odo_doors: plugin_opt_acl_file is required (the acl_file)");
		return MOSQ_ERR_INVAL;
	}
	if(!acl_load(acl_path, &acl)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "odo_doors: cannot read %s", acl_path);
		return MOSQ_ERR_INVAL;
	}
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL)){
		return MOSQ_ERR_UNKNOWN;
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	free(acl.grants);
	acl.grants = NULL;
	acl.count = 0;
	suffixed_count = 0;
	return MOSQ_ERR_SUCCESS;
}
