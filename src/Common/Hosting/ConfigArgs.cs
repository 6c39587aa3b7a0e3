using System.Collections;
using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace NbdServer.Common.Hosting;

/// <summary>
/// Settings from a JSON file and from environment variables, turned into <c>--name value</c>
/// arguments placed before the command line. One parser then validates all three sources with the
/// same messages, and the command line wins because the parsers keep the last value of an option.
/// </summary>
/// <remarks>
/// A config key is a long option name without the dashes (<c>{"listen": "0.0.0.0:10809",
/// "max-outstanding-jobs": 900, "read-only": true}</c>); an environment variable is the prefix plus
/// the option name in upper case with underscores (<c>NBD_SERVER_MAX_OUTSTANDING_JOBS=900</c>).
/// Unknown keys are errors, like unknown options: a typo must not pass silently.
/// </remarks>
public sealed partial class ConfigArgs
{
    private readonly List<Setting> _settings = [];

    private readonly List<string> _commandLine;

    private ConfigArgs(List<string> arguments, List<string> commandLine, string? configFile)
    {
        Arguments = arguments;
        _commandLine = commandLine;
        ConfigFile = configFile;
    }

    /// <summary>One setting and where it came from ("/etc/nbd-server/nbd-server.json", "environment NBD_SERVER_LISTEN", "command line").</summary>
    public sealed record Setting(string Option, string? Value, string Source);

    /// <summary>File settings, then environment settings, then the command line (without --config).</summary>
    public IReadOnlyList<string> Arguments { get; }

    /// <summary>The config file that was read, if any.</summary>
    public string? ConfigFile { get; }

    public IReadOnlyList<Setting> Settings => _settings;

    /// <summary>
    /// Builds the argument list. <paramref name="options"/> are the long options a config may set
    /// (e.g. taken from the --help text), <paramref name="flags"/> those that take no value.
    /// The config file is <c>--config FILE</c>, else <c>{prefix}CONFIG</c>, else
    /// <paramref name="defaultConfigFile"/> when it exists.
    /// </summary>
    public static ConfigArgs Build(IReadOnlyList<string> commandLine, IReadOnlySet<string> options, IReadOnlySet<string> flags,
        string environmentPrefix, string? defaultConfigFile, IDictionary? environment = null)
    {
        environment ??= Environment.GetEnvironmentVariables();
        var rest = new List<string>(commandLine.Count);
        string? configFile = null;
        for (int i = 0; i < commandLine.Count; i++)
        {
            string arg = commandLine[i];
            if (arg == "--config")
            {
                configFile = i + 1 < commandLine.Count ? commandLine[++i] : throw new ArgumentException("--config needs a value.");
            }
            else if (arg.StartsWith("--config=", StringComparison.Ordinal))
            {
                configFile = arg["--config=".Length..];
            }
            else
            {
                rest.Add(arg);
            }
        }
        string configVariable = environmentPrefix + "CONFIG";
        if (configFile is null && environment[configVariable] is string fromEnvironment && fromEnvironment.Length > 0)
        {
            configFile = fromEnvironment;
        }
        if (configFile is null && defaultConfigFile is not null && File.Exists(defaultConfigFile))
        {
            configFile = defaultConfigFile;
        }

        var settings = new List<Setting>();
        if (configFile is not null)
        {
            settings.AddRange(ReadFile(configFile, options, flags));
        }
        var fromEnvironmentSettings = new List<Setting>();
        foreach (DictionaryEntry entry in environment)
        {
            if (entry.Key is not string name || !name.StartsWith(environmentPrefix, StringComparison.Ordinal) || name == configVariable)
            {
                continue;
            }
            string option = "--" + name[environmentPrefix.Length..].ToLowerInvariant().Replace('_', '-');
            string source = $"environment variable {name}";
            if (!options.Contains(option))
            {
                throw new ArgumentException($"{source}: no setting '{option[2..]}' (variables are {environmentPrefix} + an option name of --help, e.g. {environmentPrefix}LISTEN).");
            }
            string value = entry.Value as string ?? "";
            if (flags.Contains(option))
            {
                if (ParseBool(value, source) is false)
                {
                    continue;
                }
                fromEnvironmentSettings.Add(new Setting(option, null, source));
            }
            else
            {
                fromEnvironmentSettings.Add(new Setting(option, value, source));
            }
        }
        // Environment order is arbitrary; sorted, the result is the same on every start.
        settings.AddRange(fromEnvironmentSettings.OrderBy(s => s.Option, StringComparer.Ordinal));

        var arguments = new List<string>();
        foreach (Setting s in settings)
        {
            arguments.Add(s.Option);
            if (s.Value is not null)
            {
                arguments.Add(s.Value);
            }
        }
        arguments.AddRange(rest);
        var result = new ConfigArgs(arguments, rest, configFile);
        result._settings.AddRange(settings);
        return result;
    }

    /// <summary>
    /// The long options documented in a --help text (every <c>--name</c> token), less the ones that
    /// make no sense in a config file.
    /// </summary>
    public static HashSet<string> OptionsIn(string helpText, params string[] except)
    {
        var set = new HashSet<string>(OptionToken().Matches(helpText).Select(m => m.Value), StringComparer.Ordinal);
        set.ExceptWith(except);
        set.Remove("--help");
        set.Remove("--config");
        return set;
    }

    /// <summary>
    /// Adds where a bad setting came from to a parser's message ("--listen: 'x' is not ADDRESS:PORT"
    /// becomes "… (set in /etc/nbd-server/nbd-server.json)") when it was not the command line.
    /// </summary>
    public string Explain(string message)
    {
        Match m = OptionToken().Match(message);
        if (!m.Success || m.Index > 16)
        {
            return message;
        }
        string option = m.Value;
        if (_commandLine.Exists(a => a == option || a.StartsWith(option + "=", StringComparison.Ordinal)))
        {
            return message; // the command line has the last word on this option
        }
        Setting? setting = _settings.LastOrDefault(s => s.Option == option);
        return setting is null ? message : $"{message} (set by {setting.Source})";
    }

    private static List<Setting> ReadFile(string path, IReadOnlySet<string> options, IReadOnlySet<string> flags)
    {
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"--config: cannot read {path}: {e.Message}", e);
        }
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(text, new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"{path}: not valid JSON ({e.Message})", e);
        }
        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                throw new ArgumentException($"{path}: expected a JSON object of settings, e.g. {{\"listen\": \"127.0.0.1:10809\"}}");
            }
            var settings = new List<Setting>();
            foreach (JsonProperty property in document.RootElement.EnumerateObject())
            {
                string option = "--" + property.Name.Trim().TrimStart('-');
                if (!options.Contains(option))
                {
                    throw new ArgumentException($"{path}: no setting '{property.Name}' (keys are the long option names of --help, without the dashes).");
                }
                string source = path;
                JsonElement value = property.Value;
                if (flags.Contains(option))
                {
                    bool on = value.ValueKind switch
                    {
                        JsonValueKind.True => true,
                        JsonValueKind.False or JsonValueKind.Null => false,
                        JsonValueKind.String => ParseBool(value.GetString()!, $"{path}: {property.Name}"),
                        _ => throw new ArgumentException($"{path}: '{property.Name}' is true or false."),
                    };
                    if (on)
                    {
                        settings.Add(new Setting(option, null, source));
                    }
                    continue;
                }
                string? text2 = value.ValueKind switch
                {
                    JsonValueKind.String => value.GetString(),
                    JsonValueKind.Number => value.GetRawText(),
                    JsonValueKind.Array => string.Join(",", value.EnumerateArray().Select(v => v.ValueKind == JsonValueKind.String ? v.GetString() : v.GetRawText())),
                    JsonValueKind.Null => null,
                    _ => throw new ArgumentException($"{path}: '{property.Name}' must be a string, a number or a list."),
                };
                if (text2 is not null)
                {
                    settings.Add(new Setting(option, text2, source));
                }
            }
            return settings;
        }
    }

    private static bool ParseBool(string text, string source) => text.Trim().ToLowerInvariant() switch
    {
        "1" or "true" or "yes" or "on" => true,
        "0" or "false" or "no" or "off" or "" => false,
        _ => throw new ArgumentException(string.Create(CultureInfo.InvariantCulture, $"{source}: '{text}' is not true or false.")),
    };

    [GeneratedRegex(@"--[a-z][a-z0-9-]*")]
    private static partial Regex OptionToken();
}
