using System.CommandLine;
using System.CommandLine.Help;
using System.CommandLine.Invocation;

namespace NbdServer.Common.Cli;

/// <summary>
/// One executable's command tree (System.CommandLine) and what its help, man page and bash
/// completion say. Adds <c>completion bash</c> and a hidden <c>man</c> command, replaces the stock
/// help with a man-page-like text, and makes every usage error one line on stderr and exit 2.
/// </summary>
/// <remarks>
/// A subcommand is added with <see cref="Add"/>: a <see cref="Command"/> with its options and action,
/// and a <see cref="CommandDoc"/>. An action that finds a bad value throws <see cref="ArgumentException"/>:
/// that too is a usage error (one line, exit 2).
/// </remarks>
public sealed class CliProgram
{
    public const int BadUsage = 2;

    private readonly Dictionary<Command, CommandDoc> _docs = [];

    public CliProgram(string name, string summary, CommandDoc doc)
    {
        Name = name;
        Root = new RootCommand(summary);
        // No --version (the package carries the version) and no [suggest]/[diagram] directives:
        // completion is the static script of `completion bash`.
        foreach (Option option in Root.Options.Where(o => o is VersionOption).ToList())
        {
            Root.Options.Remove(option);
        }
        Root.Directives.Clear();
        foreach (HelpOption help in Root.Options.OfType<HelpOption>())
        {
            help.Description = "this text";
            help.Action = new HelpTextAction(this);
        }
        _docs[Root] = doc;
    }

    public string Name { get; }

    public RootCommand Root { get; }

    /// <summary>Adds a subcommand (to the root, or to <paramref name="parent"/>) with its documentation.</summary>
    public Command Add(Command command, CommandDoc doc, Command? parent = null)
    {
        (parent ?? Root).Add(command);
        _docs[command] = doc;
        return command;
    }

    public CommandDoc DocOf(Command command) => _docs.TryGetValue(command, out CommandDoc? doc) ? doc : new CommandDoc();

    /// <summary>"nbd-server status": the words that select the command.</summary>
    public string PathOf(Command command)
    {
        var words = new List<string>();
        for (Command? c = command; c is not null; c = c.Parents.OfType<Command>().FirstOrDefault())
        {
            words.Insert(0, c == Root ? Name : c.Name);
        }
        return string.Join(' ', words);
    }

    /// <summary>The help text of a command, as <c>--help</c> prints it.</summary>
    public string HelpOf(Command command) => HelpText.Render(this, command);

    /// <summary>Adds <c>completion bash</c> and the hidden <c>man</c>; call once the tree is complete.</summary>
    public CliProgram Seal()
    {
        var completion = new Command("completion", "print a shell completion script");
        var bash = new Command("bash", "print the bash completion script (install as /usr/share/bash-completion/completions/" + Name + ")");
        bash.SetAction(r => r.InvocationConfiguration.Output.Write(BashCompletion.Render(this)));
        Add(completion, new CommandDoc
        {
            Synopsis = [$"{Name} completion bash"],
            Description = $"""
                Prints a bash completion script generated from the command tree: subcommands, options, and
                the values of options that have a fixed set. Install it as
                /usr/share/bash-completion/completions/{Name} (the Debian package does), or source it:
                    source <({Name} completion bash)
                """,
        });
        Add(bash, new CommandDoc { Synopsis = [$"{Name} completion bash"] }, completion);
        completion.SetAction(r =>
        {
            r.InvocationConfiguration.Error.WriteLine($"{Name} completion: name a shell: bash (see `{Name} completion --help`)");
            return BadUsage;
        });
        var man = new Command("man", "print the man page (roff)") { Hidden = true };
        man.SetAction(r => r.InvocationConfiguration.Output.Write(ManPage.Render(this)));
        Add(man, new CommandDoc());
        return this;
    }

    public int Run(IReadOnlyList<string> args, TextWriter? output = null, TextWriter? error = null) =>
        RunAsync(args, output, error).GetAwaiter().GetResult();

    public async Task<int> RunAsync(IReadOnlyList<string> args, TextWriter? output = null, TextWriter? error = null)
    {
        output ??= Console.Out;
        error ??= Console.Error;
        // No @response-file expansion: an argument starting with @ is a value, not a file to read.
        ParseResult result = Root.Parse(args, new ParserConfiguration { ResponseFileTokenReplacer = null });
        // No signal handling of System.CommandLine's own: the daemons' host (systemd or console
        // lifetime) owns SIGTERM and SIGINT, and a second handler that swallows them kept a SIGTERM'd
        // server running.
        var invocation = new InvocationConfiguration { Output = output, Error = error, EnableDefaultExceptionHandler = false, ProcessTerminationTimeout = null };
        if (result.Action is HelpTextAction)
        {
            return await result.InvokeAsync(invocation).ConfigureAwait(false);
        }
        if (result.Errors.Count > 0)
        {
            string path = PathOf(result.CommandResult.Command);
            error.WriteLine($"{Name}: {Sentence(result.Errors[0].Message)} (see `{path} --help`)");
            return BadUsage;
        }
        try
        {
            return await result.InvokeAsync(invocation).ConfigureAwait(false);
        }
        catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
        {
            error.WriteLine($"{Name}: {e.Message}");
            return BadUsage;
        }
    }

    /// <summary>System.CommandLine's "Unrecognized command or argument 'x'." as a clause.</summary>
    private static string Sentence(string message)
    {
        message = message.TrimEnd('.');
        return message.Length > 1 && char.IsUpper(message[0]) && !char.IsUpper(message[1]) ? char.ToLowerInvariant(message[0]) + message[1..] : message;
    }

    private sealed class HelpTextAction(CliProgram program) : SynchronousCommandLineAction
    {
        public override bool ClearsParseErrors => true;

        public override int Invoke(ParseResult parseResult)
        {
            parseResult.InvocationConfiguration.Output.Write(program.HelpOf(parseResult.CommandResult.Command));
            return 0;
        }
    }
}
